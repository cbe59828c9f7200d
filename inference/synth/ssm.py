"""Real bone shapes: the paediatric lower-limb statistical shape model of Carman et al. (Sci Rep 2022).

Why: every synthetic bone this project drew by formula (star-shaped sections, swept spheres) taught the
network a shaft, not a tibial plateau, an iliac wing or an ischium; the shape model gives pelvis, femur,
tibia and fibula as they are, across children aged 4–18 (mode 1 is mostly size, i.e. age).

The data come from the PyPI wheel ``articulated-ssm`` 0.2.0. Only its data files are read (its code pins
old scikit-learn and gias3, and is never imported). The wheel is fetched by ``pip download`` once into a
cache folder, at training or data-preparation time only, never by the node; the mesh data are never part
of this repository. Licence terms: ``docs/model-data.md``.

Coordinates: the model is in millimetres in the ISB pelvis frame (X anterior, Y superior, Z right, origin
near the mid-point of the anterior superior iliac spines); :func:`to_lps` turns it into patient LPS
(x toward the patient's left, y posterior, z superior), so the right leg lies at negative x.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PACKAGE = "articulated-ssm==0.2.0"
WHEEL = "articulated_ssm-0.2.0-py3-none-any.whl"
WHEEL_SHA256 = "6926ceab81ad4a614fc07660f0e6978d7aba0cbb76bf859f07e451c17c759c15"
_DIR = "articulated_ssm_both_sides/coupled_ssm/pel_fem_tib_fib_both_side/"
_HEAD = "articulated_ssm_both_sides/coupled_ssm_regions_local/femur/femur_head_{side}_verts.txt"
SIDES = ("right", "left")
_NPZ_KEYS = ("mean", "modes", "weights", "projectedWeights")  # the object arrays (SD, sizes) would need pickle

#: vertex ranges [start, stop) of each component, identical in both files
COMPONENTS = {"hip_left": (0, 4683), "hip_right": (4683, 9366), "femur": (9366, 14482), "fibula": (14482, 16560),
              "tibia": (16560, 21206)}
N_VERTICES = 21206
N_FACES = 42404


class ShapeDataMissing(RuntimeError):
    """The shape model's wheel is neither cached nor downloadable (no network, no pip)."""


def cache_dir() -> Path:
    """Where the extracted data live: ``$DICOM_NODE_SSM_CACHE`` or ``~/.cache/dicom-node/ssm``."""
    env = os.environ.get("DICOM_NODE_SSM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dicom-node" / "ssm"


def _cached_files(root: Path) -> list[Path]:
    return [root / f"{side}.npz" for side in SIDES]


def ensure_data(root: Path | None = None, wheel: Path | None = None, download: bool = True) -> Path:
    """The cache folder holding ``right.npz`` and ``left.npz`` (model, triangles, femoral-head vertices),
    extracted from ``wheel`` or from a wheel fetched with ``pip download --no-deps`` when absent."""
    root = root or cache_dir()
    if all(p.exists() for p in _cached_files(root)):
        return root
    if wheel is None:
        if not download:
            raise ShapeDataMissing(f"no shape model cached in {root} and downloading is off")
        wheel = _download(root)
    _extract(wheel, root)
    return root


def _download(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dest = root / "wheel"
    if (dest / WHEEL).exists():
        return dest / WHEEL
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--timeout", "20", "--retries", "1", PACKAGE, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ShapeDataMissing(f"pip download {PACKAGE} failed: {e}") from e
    if r.returncode != 0 or not (dest / WHEEL).exists():
        raise ShapeDataMissing(f"pip download {PACKAGE} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return dest / WHEEL


def _read_ply_faces(text: str) -> np.ndarray:
    """Triangles of the ASCII PLY (vertex order as in the npz)."""
    head, _, body = text.partition("end_header")
    counts = {p[1]: int(p[2]) for p in (line.split() for line in head.splitlines()) if p[:1] == ["element"]}
    n_v, n_f = counts.get("vertex", 0), counts.get("face", 0)
    lines = body.strip().splitlines()
    faces = np.array([ln.split() for ln in lines[n_v:n_v + n_f]], dtype=np.int64)
    if faces.shape != (n_f, 4) or not (faces[:, 0] == 3).all():
        raise ValueError("the PLY's faces are not all triangles")
    return faces[:, 1:].astype(np.int32)


def _extract(wheel: Path, root: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ShapeDataMissing(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for side in SIDES:
            with np.load(io.BytesIO(z.read(f"{_DIR}shape_model_{side}_side.pc.npz")), allow_pickle=False) as d:
                arrays = {k: np.asarray(d[k]) for k in _NPZ_KEYS}
            arrays["faces"] = _read_ply_faces(z.read(f"{_DIR}shape_model_{side}_side_mean.ply").decode("ascii"))
            arrays["head_vertices"] = np.loadtxt(io.StringIO(z.read(_HEAD.format(side=side)).decode()), dtype=np.int32)
            with tempfile.NamedTemporaryFile(dir=root, suffix=".npz", delete=False) as f:
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # stub types **kwds as allow_pickle
            os.replace(f.name, root / f"{side}.npz")


@dataclass(frozen=True)
class ShapeModel:
    """One side's coupled model: pelvis (both hip bones) and that side's femur, fibula and tibia."""

    side: str
    mean: np.ndarray  # (N, 3) mm, ISB
    modes: np.ndarray  # (3N, K) unit columns
    sd: np.ndarray  # (K,) standard deviation of each mode's coefficient (mm)
    projected: np.ndarray  # (K, n_subjects) coefficients of the training subjects, mm
    faces: np.ndarray  # (F, 3) int32
    head_vertices: np.ndarray  # femoral head vertex indices, local to the femur
    acetabulum: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # local to this leg's hip bone
    condyles: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # distal femur, local to the femur
    plateau: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # proximal tibia, local to the tibia

    @property
    def hip(self) -> str:
        """The hip bone this model's leg articulates with."""
        return f"hip_{self.side}"

    @property
    def n_modes(self) -> int:
        return int(self.sd.shape[0])

    def shape(self, b: np.ndarray) -> np.ndarray:
        """Vertices (N, 3) in ISB mm of the shape ``mean + modes @ (b * sd)``, ``b`` in SD units (length ≤ K)."""
        b = np.zeros(self.n_modes) if b is None else np.asarray(b, float)
        coef = np.zeros(self.n_modes)
        coef[: len(b)] = b[: self.n_modes]
        return (self.mean.reshape(-1) + self.modes @ (coef * self.sd)).reshape(-1, 3)

    def component_faces(self, name: str) -> np.ndarray:
        """Triangles of one component (their vertices all lie in its vertex range), without the pairs of
        coincident, opposite triangles (two inward fins on each tibia) that would leave the surface
        non-manifold; without them every component is closed, which the scan-line fill relies on."""
        lo, hi = COMPONENTS[name]
        f = self.faces
        f = f[(f[:, 0] >= lo) & (f[:, 0] < hi)]
        _, inv, counts = np.unique(np.sort(f, axis=1), axis=0, return_inverse=True, return_counts=True)
        return f[counts[inv.reshape(-1)] % 2 == 1]


def load(side: str, root: Path | None = None, download: bool = True) -> ShapeModel:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}")
    root = ensure_data(root, download=download)
    with np.load(root / f"{side}.npz", allow_pickle=False) as d:
        mean, modes, w = d["mean"].astype(np.float64), d["modes"].astype(np.float64), d["weights"].astype(np.float64)
        m = ShapeModel(side, mean.reshape(-1, 3), modes, np.sqrt(w), d["projectedWeights"].astype(np.float64),
                       d["faces"], d["head_vertices"])
    # joint surfaces, picked once on the mean shape (where the joints are right) by vertex index
    fem, tib, hip = (_part(m.mean, n) for n in ("femur", "tibia", m.hip))
    hc, r = sphere_fit(fem[m.head_vertices])
    y_f, y_t = fem[:, 1], tib[:, 1]  # ISB Y: superior
    return ShapeModel(**{**m.__dict__, "acetabulum": np.nonzero(np.linalg.norm(hip - hc, axis=1) < r + 5)[0],
                         "condyles": np.nonzero(y_f < y_f.min() + 10)[0],
                         "plateau": np.nonzero(y_t > y_t.max() - 10)[0]})


def open_edges(faces: np.ndarray) -> int:
    """Edges not shared by exactly two triangles (0 for a closed, manifold surface)."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return int((counts != 2).sum())


# --------------------------------------------------------------------------------------------- frames, poses
#: ISB (X anterior, Y superior, Z right) -> LPS rows: x_L = -Z, y_P = -X, z_S = Y (a proper rotation)
ISB_TO_LPS = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def to_lps(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, float) @ ISB_TO_LPS.T


def rotation(axis: Sequence[float] | np.ndarray, deg: float) -> np.ndarray:
    """Rotation matrix about the unit ``axis`` by ``deg`` degrees (right-hand rule)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def sphere_fit(p: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points ``p`` (n, 3): centre and radius."""
    a = np.c_[2 * p, np.ones(len(p))]
    sol, *_ = np.linalg.lstsq(a, (p**2).sum(1), rcond=None)
    c = sol[:3]
    return c, float(np.sqrt(sol[3] + c @ c))


@dataclass
class Leg:
    """One posed leg in LPS mm, and the landmarks the generators draw around it."""

    side: str  # "right" (x < 0) or "left"
    femur: np.ndarray
    tibia: np.ndarray
    fibula: np.ndarray
    hip_centre: np.ndarray
    head_radius: float
    knee_centre: np.ndarray
    ankle_centre: np.ndarray


@dataclass
class Skeleton:
    """A posed pelvis and one or two legs in LPS mm, with the triangles of each component."""

    hips: dict[str, np.ndarray]  # "hip_left"/"hip_right" -> vertices
    legs: dict[str, Leg]
    faces: dict[str, np.ndarray]  # "hip_left", "hip_right", "femur_right", ... -> triangles of its own vertices
    b: dict[str, np.ndarray]

    def meshes(self) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        """(kind, side, vertices, triangles) of every bone present; kind is femur/tibia/fibula/pelvis."""
        out = [("pelvis", k.split("_")[1], v, self.faces[k]) for k, v in self.hips.items()]
        for side, leg in self.legs.items():
            for kind in ("femur", "tibia", "fibula"):
                out.append((kind, side, getattr(leg, kind), self.faces[f"{kind}_{side}"]))
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        v = np.concatenate([m[2] for m in self.meshes()])
        return v.min(0), v.max(0)


def _joints(m: ShapeModel, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Femoral head centre minus acetabular centre, plateau centroid minus condyle centroid, femur length."""
    fem, tib, hip = _part(v, "femur"), _part(v, "tibia"), _part(v, m.hip)
    hc, _ = sphere_fit(fem[m.head_vertices])
    ac, _ = sphere_fit(hip[m.acetabulum])
    return hc - ac, tib[m.plateau].mean(0) - fem[m.condyles].mean(0), float(np.ptp(fem[:, 2]))


def articulate(m: ShapeModel, v: np.ndarray, mean: np.ndarray, knee_gap: float = 0.0) -> np.ndarray:
    """Seat the femoral head in the acetabulum and the tibia (with the fibula) under the femur, as in the
    mean shape (scaled by femur length). Why: the model's modes move the bones apart along the limb (over
    the training subjects the knee's offset varies by 65 mm SD and the hip's by 43 mm), so a sampled shape
    has its bones right but its joints dislocated. ``v`` and ``mean`` in the same (LPS) frame."""
    v = v.copy()
    hip0, knee0, len0 = _joints(m, mean)
    hip1, _, len1 = _joints(m, v)
    s = len1 / len0
    leg = slice(COMPONENTS["femur"][0], N_VERTICES)
    v[leg] += hip0 * s - hip1
    _, knee1, _ = _joints(m, v)
    shank = slice(COMPONENTS["fibula"][0], N_VERTICES)
    v[shank] += knee0 * s - knee1 - np.array([0.0, 0.0, knee_gap])
    return v


def _local_faces(model: ShapeModel, name: str) -> np.ndarray:
    return model.component_faces(name) - COMPONENTS[name][0]


def _part(v: np.ndarray, name: str) -> np.ndarray:
    lo, hi = COMPONENTS[name]
    return v[lo:hi]


def draw_b(rng: np.random.Generator, n_modes: int = 10, sd_scale: float = 1.0, extreme_p: float = 0.15) -> np.ndarray:
    """Coefficients in SD units: normal, with a share of draws pushed to 2–3.5 SD on one of the first modes."""
    b = rng.normal(0, sd_scale, n_modes)
    if rng.random() < extreme_p:
        k = int(rng.integers(0, 3))
        b[k] = rng.choice([-1, 1]) * rng.uniform(2.0, 3.5)
    return b


def posed_skeleton(models: dict[str, ShapeModel], b: np.ndarray, rng: np.random.Generator, *,
                   legs: tuple[str, ...] = SIDES, asym_sd: float = 0.15, hip_flex: tuple[float, float] = (-3, 8),
                   knee_flex: tuple[float, float] = (0, 8), abduction: tuple[float, float] = (-10, 5),
                   rot: tuple[float, float] = (-10, 10), yaw: tuple[float, float] = (-6, 6), mirror: bool = False
                   ) -> Skeleton:
    """A skeleton of shape ``b`` (right side; the left gets ``b`` plus a small asymmetry), each leg flexed at
    hip and knee about its joint centres, abducted or adducted (legs apart or touching), rotated about its
    long axis, and the whole patient turned about the vertical. ``mirror`` swaps sides by reflection (the
    right model drawn as a left leg and vice versa), doubling the shapes each model offers."""
    shapes = {}
    for side in SIDES:
        bs = b if side == "right" else b + rng.normal(0, asym_sd, len(b))
        src = ("left" if side == "right" else "right") if mirror else side
        v = articulate(models[src], to_lps(models[src].shape(bs)), to_lps(models[src].mean),
                       knee_gap=float(rng.uniform(0.0, 2.5)))
        if mirror:
            v[:, 0] = -v[:, 0]
        shapes[side] = (src, v)
    faces = {}
    src_r, v_r = shapes["right"]
    m_r = models[src_r]
    hips = {}
    for name in ("hip_left", "hip_right"):
        # with mirroring the hip bone at the patient's left comes from the other hip of the source model
        src_name = name if not mirror else ("hip_right" if name == "hip_left" else "hip_left")
        hips[name] = _part(v_r, src_name)
        f = _local_faces(m_r, src_name)
        faces[name] = f[:, ::-1] if mirror else f
    out_legs = {}
    for side in legs:
        src, v = shapes[side]
        m = models[src]
        # onto the skeleton's pelvis (the right shape's): both models share the pelvis's vertex order
        seat = (_part(v_r, m.hip)[m.acetabulum] - _part(v, m.hip)[m.acetabulum]).mean(0)
        fem, tib, fib = _part(v, "femur") + seat, _part(v, "tibia") + seat, _part(v, "fibula") + seat
        for name in ("femur", "tibia", "fibula"):  # the two models triangulate the leg bones differently
            f = _local_faces(m, name)
            faces[f"{name}_{side}"] = f[:, ::-1] if mirror else f
        hc, hr = sphere_fit(fem[m.head_vertices])
        zf = fem[:, 2]
        distal = fem[zf < zf.min() + 8]
        plateau = tib[tib[:, 2] > tib[:, 2].max() - 8]
        kc = (distal.mean(0) + plateau.mean(0)) / 2
        low = np.concatenate([tib[tib[:, 2] < tib[:, 2].min() + 8], fib[fib[:, 2] < fib[:, 2].min() + 8]])
        ac = low.mean(0)
        sg = -1.0 if side == "right" else 1.0  # lateral direction in x
        # hip: flexion (about x: knee goes anterior = -y), abduction (about y), internal/external rotation
        r_hip = (rotation([1, 0, 0], -float(rng.uniform(*hip_flex)))  # + moves the knee anterior (-y)
                 @ rotation([0, 1, 0], -sg * float(rng.uniform(*abduction)))  # + moves the knee lateral
                 @ rotation(kc - hc, float(rng.uniform(*rot))))
        r_knee = rotation([1, 0, 0], float(rng.uniform(*knee_flex)))  # + moves the ankle posterior

        def at(p: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
            return (p - c) @ r.T + c

        fem, tib, fib = at(fem, r_hip, hc), at(tib, r_hip, hc), at(fib, r_hip, hc)
        kc2, ac2 = at(kc, r_hip, hc), at(ac, r_hip, hc)
        tib, fib, ac2 = at(tib, r_knee, kc2), at(fib, r_knee, kc2), at(ac2, r_knee, kc2)
        drop = _seat_knee(fem, faces[f"femur_{side}"], tib, faces[f"tibia_{side}"])
        tib, fib, ac2 = tib - drop, fib - drop, ac2 - drop
        out_legs[side] = Leg(side, fem, tib, fib, hc, hr, kc2, ac2)
    sk = Skeleton(hips, out_legs, faces, {"right": b})
    r_yaw = rotation([0, 0, 1], float(rng.uniform(*yaw)))
    centre = np.mean([(v.min(0) + v.max(0)) / 2 for v in hips.values()], axis=0)
    _transform(sk, lambda p: (p - centre) @ r_yaw.T + centre)
    _keep_apart(sk)
    return sk


def _seat_knee(fem: np.ndarray, ff: np.ndarray, tib: np.ndarray, ft: np.ndarray, step: float = 0.75) -> np.ndarray:
    """The shift that moves the tibia down (along its axis) until it no longer runs into the femur: a
    flexion about one fixed point rolls the plateau's back edge into the condyles, which a real knee avoids."""
    axis = tib[tib[:, 2] > tib[:, 2].max() - 30].mean(0) - tib[tib[:, 2] < tib[:, 2].min() + 30].mean(0)
    axis /= np.linalg.norm(axis)
    lo = np.maximum(fem.min(0), tib.min(0)) - 1
    hi = np.minimum(fem.max(0), tib.max(0)) + 1
    shift = np.zeros(3)
    if np.any(hi <= lo):
        return shift
    xs, ys = np.arange(lo[0], hi[0], 1.0), np.arange(lo[1], hi[1], 1.0)
    zs = np.arange(fem[:, 2].min() - 0.5, tib[:, 2].max() + 0.5, 1.0)
    if len(xs) < 2 or len(ys) < 2 or len(zs) == 0:
        return shift
    f_occ = voxelise(fem, ff, zs, xs, ys) > 0
    for _ in range(12):
        t_occ = voxelise(tib - shift, ft, zs, xs, ys) > 0
        if (f_occ & t_occ).sum() <= 0.002 * max(int(t_occ.sum()), 1) + 2:
            break
        shift = shift + step * axis
    return shift


def _transform(sk: Skeleton, fn) -> None:
    for k in sk.hips:
        sk.hips[k] = fn(sk.hips[k])
    for leg in sk.legs.values():
        for name in ("femur", "tibia", "fibula", "hip_centre", "knee_centre", "ankle_centre"):
            setattr(leg, name, fn(getattr(leg, name)))


def _keep_apart(sk: Skeleton, gap: float = 1.0) -> None:
    """Legs touching is allowed, legs through each other is not: shift both legs apart (about their
    hips' pivot, i.e. a little abduction) until their bones no longer overlap across the midline."""
    if len(sk.legs) < 2:
        return
    r, left = sk.legs["right"], sk.legs["left"]
    for _ in range(30):
        worst = 0.0
        for kind in ("femur", "tibia"):
            a, b = getattr(r, kind), getattr(left, kind)
            z0, z1 = max(a[:, 2].min(), b[:, 2].min()), min(a[:, 2].max(), b[:, 2].max())
            if z1 <= z0:
                continue
            edges = np.linspace(z0, z1, 24)
            ia, ib = np.digitize(a[:, 2], edges), np.digitize(b[:, 2], edges)
            for k in range(1, len(edges)):
                sa, sb = a[ia == k, 0], b[ib == k, 0]
                if len(sa) and len(sb):
                    worst = max(worst, sa.max() + gap - sb.min())
        if worst <= 0:
            return
        for leg, sg in ((r, -1.0), (left, 1.0)):
            r_ab = rotation([0, 1, 0], -sg * 1.0)
            for name in ("femur", "tibia", "fibula", "knee_centre", "ankle_centre"):
                setattr(leg, name, (getattr(leg, name) - leg.hip_centre) @ r_ab.T + leg.hip_centre)


# --------------------------------------------------------------------------------------------- voxelisation
def section_segments(v: np.ndarray, f: np.ndarray, z: float) -> np.ndarray:
    """Line segments (S, 2, 2) (x, y) where the plane at height ``z`` cuts the triangles ``f`` of ``v``."""
    tz = v[f, 2]  # (F, 3)
    above = tz > z
    n_above = above.sum(1)
    cut = (n_above == 1) | (n_above == 2)
    if not cut.any():
        return np.zeros((0, 2, 2))
    tri = v[f[cut]]  # (C, 3, 3)
    ab = above[cut]
    pts = []
    for i, j in ((0, 1), (1, 2), (2, 0)):
        pi, pj = tri[:, i], tri[:, j]
        crosses = ab[:, i] != ab[:, j]
        t = (z - pi[:, 2]) / np.where(crosses, pj[:, 2] - pi[:, 2], 1.0)
        p = pi[:, :2] + t[:, None] * (pj[:, :2] - pi[:, :2])
        pts.append((crosses, p))
    # each cut triangle has exactly two crossing edges: take them in edge order
    c = np.stack([p[0] for p in pts], 1)  # (C, 3)
    xy = np.stack([p[1] for p in pts], 1)  # (C, 3, 2)
    order = np.argsort(~c, axis=1, kind="stable")[:, :2]
    return np.take_along_axis(xy, order[:, :, None], axis=1)


def fill_section(seg: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Inside mask (len(ys), len(xs)) of the closed polygons made of ``seg``, by scan-line parity: each
    segment toggles, on every row whose centre it spans (half-open), the pixels right of its crossing."""
    ny, nx = len(ys), len(xs)
    out = np.zeros((ny, nx), bool)
    if len(seg) == 0:
        return out
    y0, y1 = seg[:, 0, 1], seg[:, 1, 1]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    dy = ys[1] - ys[0] if ny > 1 else 1.0
    r0 = np.ceil((lo - ys[0]) / dy - 1e-9).astype(np.int64)
    r1 = np.ceil((hi - ys[0]) / dy - 1e-9).astype(np.int64)  # rows r0 .. r1-1 have lo <= y < hi
    r0, r1 = np.clip(r0, 0, ny), np.clip(r1, 0, ny)
    n = r1 - r0
    if n.sum() == 0:
        return out
    si = np.repeat(np.arange(len(seg)), n)
    rows = np.repeat(r0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    yr = ys[rows]
    t = (yr - y0[si]) / (y1[si] - y0[si])
    xc = seg[si, 0, 0] + t * (seg[si, 1, 0] - seg[si, 0, 0])
    dx = xs[1] - xs[0] if nx > 1 else 1.0
    col = np.clip(np.ceil((xc - xs[0]) / dx - 1e-9).astype(np.int64), 0, nx)
    tog = np.zeros((ny, nx + 1), np.int32)
    np.add.at(tog, (rows, col), 1)
    return (np.cumsum(tog[:, :nx], axis=1) & 1).astype(bool)


def voxelise_slice(v: np.ndarray, f: np.ndarray, z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Inside mask of the closed mesh on the axial plane ``z`` at pixel centres ``xs`` (columns) × ``ys`` (rows)."""
    z = float(z)
    if np.any(np.abs(v[:, 2] - z) < 1e-6):  # a vertex on the plane: move the plane a hair
        z += 1e-4
    return fill_section(section_segments(v, f, z), xs, ys)


def voxelise(v: np.ndarray, f: np.ndarray, zs: np.ndarray, xs: np.ndarray, ys: np.ndarray, thickness: float = 0.0,
             sub: int = 1) -> np.ndarray:
    """Occupancy (len(zs), len(ys), len(xs)) float32 of a closed mesh: for ``sub`` > 1 the mean over ``sub``
    planes spread evenly across ``thickness`` about each z (partial volume through the slice)."""
    offs = (np.arange(sub) + 0.5) / sub * thickness - thickness / 2 if sub > 1 else np.zeros(1)
    out = np.zeros((len(zs), len(ys), len(xs)), np.float32)
    zmin, zmax = v[:, 2].min(), v[:, 2].max()
    for k, z in enumerate(zs):
        if z + offs.max() < zmin or z + offs.min() > zmax:
            continue
        acc = np.zeros((len(ys), len(xs)), np.float32)
        for o in offs:
            acc += voxelise_slice(v, f, z + o, xs, ys)
        out[k] = acc / len(offs)
    return out


def mesh_volume(v: np.ndarray, f: np.ndarray) -> float:
    """Enclosed volume (mm³, signed by orientation) by the divergence theorem."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)
