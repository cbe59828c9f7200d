"""A third phantom family, for testing only: a stand-in for a foreign site's data. NEVER used in training.

Why: the acceptance phantom is secret and was written by someone else, so a model must be judged on data
that neither the classic phantoms (``inference.phantom``: elliptic tubes, piecewise-linear radii) nor the
training generator (``labelmap``: star-shaped cross-sections slice by slice) produced. Built differently
on purpose: every bone and limb is a signed-distance "sweep" — spheres swept along curved (Bézier) axes
with varying radius — evaluated at each voxel's patient position; the tibia carries an anterior crest
ridge, the femur separate condyles and an anterior bow, the pelvis is a fan of swept struts (iliac wing),
rami around the obturator foramen and a cup around the head; proportions follow body height. Contrast is
fixed and ordinary T1-like (fat and marrow bright, muscle grey, cortex dark) with a posterior-coil bias
and Rician noise; acquisition 1.2–1.8 mm pixels, 5–8 mm slices, 100–140 axial slices, feet first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..phantom import FEMUR, FIBULA, PELVIS, TIBIA, Geometry, Phantom

T1 = {"air": 0.0, "skin": 0.5, "fat": 0.9, "muscle": 0.33, "streak": 0.75, "cortex": 0.04, "marrow": 0.8,
      "fluid": 0.12, "vessel": 0.06, "cavity": 0.4}


@dataclass
class Sweep:
    """A sphere of radius r(t) swept along a polyline (sampled Bézier), optionally squashed in x/y."""

    pts: np.ndarray  # (n, 3) mm, LPS
    radii: np.ndarray  # (n,)
    squash: tuple[float, float] = (1.0, 1.0)  # divide x, y offsets by these (elliptic sections)

    def sdf(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Approximate signed distance (mm, < 0 inside) on one axial slice."""
        out = np.full(x.shape, np.inf)
        sx, sy = self.squash
        rmax = float(self.radii.max())
        for a, b, ra, rb in zip(self.pts[:-1], self.pts[1:], self.radii[:-1], self.radii[1:]):
            if z < min(a[2], b[2]) - rmax or z > max(a[2], b[2]) + rmax:
                continue
            d = b - a
            ll = float(d @ d) + 1e-9
            # closest point on the segment, in the squashed frame
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / ll, 0, 1)
            ex, ey, ez = (px - t * d[0]) / sx, (py - t * d[1]) / sy, pz - t * d[2]
            out = np.minimum(out, np.sqrt(ex**2 + ey**2 + ez**2) - (ra + t * (rb - ra)))
        return out


def bezier(p0, p1, p2, n: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _sweep(p0, p1, p2, r0: float, r1: float, n: int = 8, squash=(1.0, 1.0)) -> Sweep:
    return Sweep(bezier(p0, p1, p2, n), np.linspace(r0, r1, n), squash)


@dataclass
class Body:
    """Bones (label -> sweeps), unlabelled bones, soft tissue and vessels of one foreign phantom."""

    bones: dict
    other: list
    limbs: list
    vessels: list
    cups: list  # (centre, r_in, r_out, side)
    fat: float
    cortex: float
    z_top: float
    sacrum_is_pelvis: bool = False  # bones[PELVIS][0] is the sacrum


def random_body(rng: np.random.Generator, sacrum_is_pelvis: bool = False) -> Body:
    h = rng.uniform(1250, 1900)  # body height (mm): older child to tall adult
    s = h / 1700
    lf, lt = 0.245 * h, 0.245 * h * rng.uniform(0.84, 0.95)  # tibia relatively long
    z_hip = 0.0
    z_knee = z_hip - lf
    z_ank = z_knee - lt
    dh, dk, da = 92 * s, rng.uniform(48, 95) * s, rng.uniform(45, 85) * s
    rh = 24 * s
    bones: dict = {FEMUR: [], TIBIA: [], FIBULA: [], PELVIS: []}
    other, limbs, vessels, cups = [], [], [], []
    # sacrum: tapered sweep along a curve bowing posteriorly, drawn with the pelvis (one bone surface, so the
    # image is the same under either definition) and, unless sacrum_is_pelvis, labelled background where it
    # is not also hip bone (the node's PELVIS is the two hip bones)
    bones[PELVIS].append(_sweep((0, 55 * s, 120 * s), (0, 95 * s, 60 * s), (0, 75 * s, -10 * s), 34 * s, 10 * s,
                                squash=(1.6, 0.8)))
    for sg in (1, -1):
        yaw = np.deg2rad(rng.uniform(5, 20)) * sg  # legs turned out
        hc = np.array([sg * dh, 0.0, z_hip])
        # femur: head, neck to the trochanter, bowed shaft, two condyles
        bones[FEMUR].append(Sweep(hc[None], np.array([rh])))
        troch = hc + [sg * 45 * s, 8 * s, -40 * s]
        bones[FEMUR].append(_sweep(hc, hc + [sg * 25 * s, 0, -10 * s], troch, 0.65 * rh, 20 * s, 5))
        kc = np.array([sg * dk, 6 * s, z_knee + 22 * s])
        bones[FEMUR].append(_sweep(troch, ((troch + kc) / 2) + [0, -12 * s, 0], kc, 15 * s, 19 * s, 10))
        for m in (1, -1):  # condyles
            bones[FEMUR].append(_sweep(kc + [m * 18 * s, -10 * s, 12 * s], kc + [m * 20 * s, 0, 0],
                                       kc + [m * 20 * s, 10 * s, -12 * s], 17 * s, 15 * s, 5))
        other.append(_sweep(kc + [0, -42 * s, 30 * s], kc + [0, -46 * s, 15 * s], kc + [0, -44 * s, 0], 9 * s, 9 * s, 4,
                            squash=(2.2, 0.9)))  # patella (not labelled)
        # tibia: plateau, shaft with an anterior crest, distal end
        tp = np.array([sg * dk, 8 * s, z_knee - 12 * s])
        ta = np.array([sg * da, 6 * s, z_ank + 10 * s])
        bones[TIBIA].append(_sweep(tp + [0, 0, 8 * s], tp, tp + [0, 0, -30 * s], 30 * s, 20 * s, 4,
                                   squash=(1.35, 0.85)))
        bones[TIBIA].append(_sweep(tp, (tp + ta) / 2 + [0, -6 * s, 0], ta, 15 * s, 13 * s, 10))
        # three borders (anterior crest, posteromedial, posterolateral): a rounded-triangle shaft section
        for ang_b, rad in ((-np.pi / 2, 6.5), (np.pi / 2 + sg * 1.1, 6.0), (np.pi / 2 - sg * 1.0, 5.5)):
            ab = ang_b + yaw
            off_b = np.array([np.cos(ab) * 11 * s, np.sin(ab) * 11 * s, 0])
            bones[TIBIA].append(_sweep(tp + off_b + [0, -6 * s * (ang_b < 0), -40 * s],
                                       (tp + ta) / 2 + off_b + [0, -6 * s, 0],
                                       ta + off_b + [0, 0, 60 * s], rad * s, 4.5 * s, 10))
        bones[TIBIA].append(Sweep(np.array([ta, ta + [0, 0, -12 * s]]), np.array([21 * s, 19 * s])))
        # fibula: posterolateral, a thin curved sweep from its head to the lateral malleolus
        ang = rng.uniform(0.7, 1.3)  # posterolateral
        off = np.array([sg * np.cos(ang), np.sin(ang), 0]) * 27 * s
        fr = rng.uniform(6.5, 9) * s
        bones[FIBULA].append(_sweep(tp + off + [0, 0, -12 * s], (tp + ta) / 2 + off * 0.75,
                                    ta + off * 0.85 + [0, 0, -28 * s], 1.3 * fr, fr, 10))
        other.append(Sweep(np.array([ta + [0, 10 * s, -45 * s]]), np.array([24 * s])))  # talus
        # pelvis: iliac wing as a fan of struts, rami around the obturator foramen, cup around the head
        arc = np.linspace(-0.9, 1.8, 14)
        crest = [hc + [sg * (60 * s - 8 * s * a * a) * np.cos(a) - sg * 20 * s, (60 * s - 8 * s * a * a) * np.sin(a),
                       120 * s]
                 for a in arc]
        for cpt in crest:  # struts dense enough to merge into a plate
            mid = (hc + cpt) / 2 + [sg * 14 * s, 0, 0]
            bones[PELVIS].append(_sweep(hc + [0, 0, 30 * s], mid, cpt, 10 * s, 6 * s, 6))
        sym = np.array([sg * 8 * s, -45 * s, z_hip - 45 * s])
        isch = hc + [-sg * 15 * s, 30 * s, -80 * s]
        bones[PELVIS].append(_sweep(hc + [-sg * 10 * s, -15 * s, 0], hc + [-sg * 55 * s, -45 * s, -15 * s], sym,
                                    10 * s, 8 * s, 6))
        bones[PELVIS].append(_sweep(sym, sym + [sg * 35 * s, 40 * s, -40 * s], isch, 7 * s, 12 * s, 6))
        bones[PELVIS].append(_sweep(hc + [-sg * 8 * s, 20 * s, -5 * s], hc + [-sg * 10 * s, 30 * s, -40 * s], isch,
                                    11 * s, 12 * s, 5))
        cups.append((hc, rh + 2.5, rh + 2.5 + 9 * s, sg))
        # the limb
        limbs.append(_sweep(hc + [sg * 15 * s, 0, 20 * s], kc + [sg * 5 * s, 0, 150 * s], kc + [0, 15 * s, 0],
                            85 * s, 52 * s, 8))
        limbs.append(_sweep(kc + [0, 15 * s, 0], (kc + ta) / 2 + [0, 25 * s, 60 * s], ta + [0, 10 * s, -60 * s],
                            50 * s, 32 * s, 8))
        vessels.append(_sweep(hc + [-sg * 20 * s, -25 * s, 10 * s], kc + [-sg * 15 * s, 10 * s, 200 * s],
                              kc + [0, 40 * s, 0], 4 * s, 3.5 * s, 8))
    limbs.append(Sweep(np.array([[0, 20 * s, 170 * s], [0, 25 * s, z_hip - 40 * s]]), np.array([110 * s, 95 * s]),
                       squash=(1.75, 1.0)))  # lower trunk
    return Body(bones, other, limbs, vessels, cups, rng.uniform(6, 20) * s, rng.uniform(1.8, 3.2), 140 * s,
                sacrum_is_pelvis)


def render_points(b: Body, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """T1-like intensity and labels on one axial slice at height ``z``."""
    img = np.zeros(x.shape)
    lab = np.zeros(x.shape, np.uint8)
    d_body = np.min([lb.sdf(x, y, z) for lb in b.limbs], axis=0)
    img[d_body < 0] = T1["skin"]
    img[d_body < -2.0] = T1["fat"]
    muscle = d_body < -2.0 - b.fat
    img[muscle] = T1["muscle"]
    streak = muscle & (np.abs(np.sin(0.09 * x + 0.05 * y + 0.01 * z) * np.sin(0.07 * y - 0.04 * x)) < 0.03)
    img[streak] = T1["streak"]
    cavity = muscle & ((x / 70) ** 2 + ((y - 10) / 50) ** 2 < 1) & (z > 10) & (z < 130)
    img[cavity] = T1["cavity"]
    for v in b.vessels:
        img[muscle & (v.sdf(x, y, z) < 0)] = T1["vessel"]
    for c, r_in, r_out, sg in b.cups:
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        medial = (x - c[0]) * sg < 0.4 * d
        shell = (d > r_in) & (d < r_out) & (medial | (z > c[2] + 0.3 * r_in)) & (z > c[2] - 0.6 * r_in)
        img[(d < r_in) & muscle] = T1["fluid"]
        img[shell] = T1["cortex"]
        img[shell & (d > r_in + b.cortex) & (d < r_out - b.cortex)] = T1["marrow"]
        lab[shell] = PELVIS
    for value, sweeps in list(b.bones.items()) + [(0, b.other)]:
        if not sweeps:
            continue
        sdf = [sw.sdf(x, y, z) for sw in sweeps]
        d = np.min(sdf, axis=0)
        inside = d < 0
        img[inside] = T1["cortex"]
        img[d < -b.cortex] = T1["marrow"]
        lab[inside] = value
        if value == PELVIS and not b.sacrum_is_pelvis:  # the sacrum alone: drawn, not labelled
            lab[(sdf[0] < 0) & (np.min(sdf[1:], axis=0) >= 0)] = 0
    return img, lab


def make_case(seed: int, coarsen: int = 1, sacrum_is_pelvis: bool = False) -> Phantom:
    """One foreign-family case on its own random acquisition grid (feet-first axial, superior slice first).

    ``coarsen`` > 1 multiplies pixel size and slice step (same anatomy and coverage, fewer voxels): for
    quick tests only, it leaves the family's acquisition ranges. ``sacrum_is_pelvis``: the truth's pelvis
    includes the sacrum, as this family's tables before 2026-12-07 were measured (the image is the same).
    """
    rng = np.random.default_rng(seed)
    b = random_body(rng, sacrum_is_pelvis)
    ps = float(rng.uniform(1.2, 1.8)) * coarsen
    thick = float(rng.uniform(5.0, 8.0)) * coarsen
    n = int(rng.integers(100, 141)) // coarsen
    width = 2 * 195 * (b.z_top / 140) * rng.uniform(1.1, 1.35)  # trunk and both thighs, with a margin
    cols = int(round(width / ps / 2) * 2)
    rows = int(round(cols * rng.uniform(0.55, 0.75)))
    ox = -(cols - 1) / 2 * ps + rng.uniform(-10, 10)
    oy = -(rows - 1) / 2 * ps + 20 * b.z_top / 140
    geom = Geometry(rows, cols, n, (ps, ps), (ox, oy, b.z_top), slice_step=(0.0, 0.0, -thick), slice_thickness=thick)
    img = np.empty((n, rows, cols), np.float32)
    lab = np.empty((n, rows, cols), np.uint8)
    x, y = np.meshgrid(ox + np.arange(cols) * ps, oy + np.arange(rows) * ps)
    bias = np.exp(0.35 * (y - y.mean()) / (y.max() - y.min()) - 0.3 * ((x / x.max()) ** 2))
    for k in range(n):
        z = b.z_top - k * thick
        im, lb = render_points(b, x, y, z)
        im = im * bias
        n1, n2 = rng.normal(0, 0.025, (2, rows, cols))
        img[k] = np.sqrt((im + n1) ** 2 + n2**2)
        lab[k] = lb
    return Phantom(anatomy=None, geometry=geom, image=np.clip(img * 2500, 0, 4095).astype(np.uint16), labels=lab)  # type: ignore[arg-type]


def write_dataset(root: Path, n_cases: int, seed: int = 0, prefix: str = "fo", coarsen: int = 1) -> list[str]:
    """``n_cases`` foreign cases (DICOM + per-bone NIfTI masks) in the layout ``dicom-node evaluate`` reads."""
    from ..phantom_io import write_training_case
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_cases):
        name = f"{prefix}{seed + i:05d}"
        write_training_case(make_case(seed + i, coarsen), root, name, seed=seed + i)
        names.append(name)
    return names
