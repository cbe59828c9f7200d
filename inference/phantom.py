"""Synthetic lower-limb MRI phantoms: pelvis, femur, tibia and fibula with cortex and marrow, muscle, fat
and skin, both legs, rendered at any DICOM geometry.

No labelled MRI can be shipped, so the tests, the demo model and the benchmarks all use these phantoms.
The anatomy is defined analytically in patient coordinates (LPS, mm) and every voxel is rendered from its
own physical position, so the same phantom can be sampled on any grid: any in-plane size and spacing, any
slice order or direction, even oblique or sagittal planes. Ground truth labels therefore sit exactly where
the geometry says, which is what the inverse-mapping tests need.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

FEMUR, TIBIA, FIBULA, PELVIS = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """A stack of parallel slices, as DICOM describes it.

    ``origin`` is the ImagePositionPatient of the first slice, ``row_dir`` the direction along a row
    (increasing column index), ``col_dir`` the direction down a column (increasing row index),
    ``slice_step`` the vector from one slice's origin to the next.
    """

    rows: int
    cols: int
    n_slices: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM PixelSpacing
    origin: tuple[float, float, float]
    row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_step: tuple[float, float, float] = (0.0, 0.0, -3.0)
    slice_thickness: float = 3.0

    def slice_origin(self, k: int) -> np.ndarray:
        return np.asarray(self.origin) + k * np.asarray(self.slice_step)

    def slice_origins(self) -> np.ndarray:
        """(n_slices, 3): every slice's ImagePositionPatient, as a SeriesVolume carries them."""
        return np.asarray(self.origin) + np.arange(self.n_slices)[:, None] * np.asarray(self.slice_step)

    def world_coords(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient coordinates (x, y, z) of every pixel centre of slice ``k``, each (rows, cols)."""
        r = np.arange(self.rows, dtype=np.float64)[:, None]
        c = np.arange(self.cols, dtype=np.float64)[None, :]
        o = self.slice_origin(k)
        rd, cd = np.asarray(self.row_dir), np.asarray(self.col_dir)
        dr, dc = self.pixel_spacing
        pts = [o[i] + c * dc * rd[i] + r * dr * cd[i] for i in range(3)]
        return pts[0], pts[1], pts[2]


# --------------------------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class Anatomy:
    """Size, pose and tissue contrast of one synthetic child or adult."""

    scale: float = 0.85  # 1.0 ~ small adult, 0.55 ~ young child
    yaw_deg: float = 0.0  # rotation about the S axis
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mm, applied to the whole body
    legs: str = "both"  # "both", "left" or "right": one-legged phantoms make left/right errors visible
    leg_spread: float = 0.0  # mm added to the distance between the legs
    fat_mm: float = 10.0
    cortex_mm: float = 2.5
    intensities: dict = field(
        default_factory=lambda: {
            "fat": 0.92,
            "muscle": 0.35,
            "cortex": 0.06,
            "marrow": 0.7,
            "skin": 0.55,
            "viscera": 0.45,
        }
    )
    noise: float = 0.02
    bias: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    texture_seed: int = 0
    #: the sacrum as part of the PELVIS label (the definition before 2026-12-07; v0.2.0 was trained on it).
    #: The node's PELVIS is the two hip bones, as in the shape model and the acceptance phantoms: the sacrum
    #: is bone the node does not segment, drawn but labelled background.
    sacrum_is_pelvis: bool = False

    # key heights (mm, relative to the iliac crest at z=0 before shift)
    @property
    def z_head(self) -> float:
        return -0.62 * 200 * self.scale

    @property
    def z_knee(self) -> float:
        return self.z_head - 430 * self.scale

    @property
    def z_ankle(self) -> float:
        return self.z_knee - 8 * self.scale - 360 * self.scale

    @property
    def z_extent(self) -> tuple[float, float]:
        """(top, bottom) of the rendered body in anatomy coordinates."""
        return 15.0 * self.scale, self.z_ankle - 40 * self.scale


def _tube(x, y, z, zk, cx, cy, rx, ry):
    """Normalised elliptic radius of a tube whose centre and radii are piecewise linear in z.

    Returns rho (rho <= 1 inside) and the mean radius at each point; points outside [zk[0], zk[-1]]
    get rho = inf.
    """
    zk = np.asarray(zk, dtype=np.float64)
    order = np.argsort(zk)
    zs = zk[order]

    def f(v):
        return np.interp(z, zs, np.asarray(v, dtype=np.float64)[order])

    rxz, ryz = f(rx), f(ry)
    rho = np.sqrt(((x - f(cx)) / rxz) ** 2 + ((y - f(cy)) / ryz) ** 2)
    rho = np.where((z >= zs[0]) & (z <= zs[-1]), rho, np.inf)
    return rho, 0.5 * (rxz + ryz)


def _solid(x, y, z, zk, cx, cy, rx, ry, cortex):
    """(inside, marrow) masks of a solid bone tube with a cortical shell ``cortex`` mm thick."""
    rho, rmean = _tube(x, y, z, zk, cx, cy, rx, ry)
    inside = rho <= 1.0
    marrow = rho <= np.maximum(1.0 - cortex / np.maximum(rmean, 1e-3), 0.0)
    return inside, marrow & inside


def _ring(x, y, z, zk, cx, cy, rx, ry, thick, cortex, ang=None):
    """(inside, marrow) masks of a curved bony plate: an elliptic ring ``thick`` mm wide.

    ``ang`` optionally restricts the ring to polar angles (radians, in [-pi, pi]) between two limits.
    """
    rho, rmean = _tube(x, y, z, zk, cx, cy, rx, ry)
    dist = np.abs(rho - 1.0) * rmean
    inside = dist <= thick / 2
    marrow = dist <= max(thick / 2 - cortex, 0.0)
    if ang is not None:
        zs = np.sort(np.asarray(zk, dtype=np.float64))
        ccx = np.interp(z, zs, np.asarray(cx, dtype=np.float64)[np.argsort(zk)])
        ccy = np.interp(z, zs, np.asarray(cy, dtype=np.float64)[np.argsort(zk)])
        a = np.arctan2(y - ccy, x - ccx)
        lo, hi = ang
        ok = (a >= lo) & (a <= hi) if lo <= hi else (a >= lo) | (a <= hi)
        inside &= ok
        marrow &= ok
    return inside, marrow & inside


def _texture(x, y, z, seed: int, amp: float) -> np.ndarray:
    """Smooth pseudo-random texture: a few random plane waves, cheap and continuous in 3D."""
    rng = np.random.default_rng(seed)
    t = np.zeros(np.broadcast(x, y, z).shape)
    for _ in range(6):
        k = rng.normal(size=3)
        k *= rng.uniform(0.02, 0.12) / np.linalg.norm(k)
        t += np.sin(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * np.pi))
    return amp * t / 6


def render_points(anat: Anatomy, x, y, z) -> tuple[np.ndarray, np.ndarray]:
    """Render intensity (float, before noise) and labels (uint8) at patient coordinates x, y, z."""
    s = anat.scale
    # into the anatomy frame: undo shift and yaw
    x0, y0, z = x - anat.shift[0], y - anat.shift[1], z - anat.shift[2]
    th = np.deg2rad(anat.yaw_deg)
    x = np.cos(th) * x0 + np.sin(th) * y0
    y = -np.sin(th) * x0 + np.cos(th) * y0

    tone = anat.intensities
    cort = anat.cortex_mm * (0.6 + 0.4 * s)
    zh, zk, za = anat.z_head, anat.z_knee, anat.z_ankle
    dh = 85 * s + anat.leg_spread / 2  # hip centre half-distance
    dk = 55 * s + anat.leg_spread / 2  # knee centre half-distance
    rh = 22 * s

    shape = np.broadcast(x, y, z).shape
    img = np.zeros(shape)
    lab = np.zeros(shape, dtype=np.uint8)
    outline = np.zeros(shape, dtype=bool)
    muscle_region = np.zeros(shape, dtype=bool)
    skin_core = np.zeros(shape, dtype=bool)
    bones: list[tuple[int, np.ndarray, np.ndarray]] = []
    septa = np.zeros(shape, dtype=bool)
    fat = anat.fat_mm * (0.5 + 0.5 * s)

    # ---- body (pelvic region): one ellipse around both hips, ending below the groin
    zb = [25 * s, zh - 40 * s, zh - 85 * s]
    rxb = [dh + 55 * s, dh + 75 * s, dh + 40 * s]
    ryb = [95 * s, 105 * s, 70 * s]
    for grow, target in ((0.0, outline), (-1.5, skin_core), (-fat, muscle_region)):
        rho, _ = _tube(x, y, z, zb, [0, 0, 0], [15 * s] * 3, np.add(rxb, grow), np.add(ryb, grow))
        target |= rho <= 1
    # pelvic viscera
    rho, _ = _tube(x, y, z, [10 * s, zh - 30 * s], [0, 0], [5 * s, 10 * s], [55 * s, 35 * s], [45 * s, 30 * s])
    viscera = rho <= 1

    # sacrum: bone drawn but not segmented (label 0) unless the old definition is asked for
    sacrum = PELVIS if anat.sacrum_is_pelvis else 0
    bones.append((sacrum, *_solid(x, y, z, [0, -0.5 * 200 * s], [0, 0], [62 * s, 70 * s], [40 * s, 18 * s],
                                  [18 * s, 10 * s], cort)))

    sides = {"left": 1.0, "right": -1.0}
    for side, sg in sides.items():
        # iliac wing: a posterolateral arc of an ellipse, widening upwards
        zw = [10 * s, -0.2 * 200 * s, -0.5 * 200 * s]
        ang = (-2.6, 0.9) if sg > 0 else (np.pi - 0.9, -np.pi + 2.6)
        bones.append(
            (PELVIS, *_ring(x, y, z, zw, [sg * 70 * s, sg * 65 * s, sg * 60 * s], [25 * s, 20 * s, 15 * s],
                            [45 * s, 38 * s, 25 * s], [45 * s, 40 * s, 28 * s], 10 * s, cort, ang))
        )
        # acetabulum: a cup around the femoral head (medial and superior), separated by a joint space
        za_ = [zh + rh + 8 * s, zh, zh - 0.6 * rh]
        ra = rh + 2.0 + 6 * s
        bones.append(
            (PELVIS, *_ring(x, y, z, za_, [sg * dh] * 3, [0, 0, 0], [ra * 0.7, ra, ra * 0.8], [ra * 0.7, ra, ra * 0.8],
                            11 * s, cort))
        )
        # ischiopubic ring (obturator frame) below the head, meeting at the symphysis
        zo = [zh - 0.5 * rh, zh - 30 * s, zh - 60 * s]
        bones.append(
            (PELVIS, *_ring(x, y, z, zo, [sg * (dh - 38 * s)] * 3, [-5 * s, 0, 5 * s],
                            [30 * s, 33 * s, 25 * s], [30 * s, 35 * s, 28 * s], 9 * s, cort))
        )
        if anat.legs not in ("both", side):
            continue
        # femur: head (sphere), neck, shaft, condyles
        zz = np.linspace(zh - rh * 0.999, zh + rh * 0.999, 13)
        rr = np.sqrt(np.maximum(rh**2 - (zz - zh) ** 2, 0.5))
        bones.append((FEMUR, *_solid(x, y, z, zz, [sg * dh] * 13, [0] * 13, rr, rr, cort)))
        bones.append(
            (FEMUR, *_solid(x, y, z, [zh - 5 * s, zh - 30 * s, zh - 55 * s],
                            [sg * (dh + 12 * s), sg * (dh + 26 * s), sg * (dh + 30 * s)],
                            [0, 0, 2 * s], [15 * s, 20 * s, 16 * s], [14 * s, 15 * s, 14 * s], cort))
        )
        zf = [zh - 50 * s, zh - 200 * s, zk + 60 * s, zk + 25 * s, zk + 2 * s]
        cxf = [sg * (dh + 28 * s), sg * (dh + 8 * s), sg * (dk + 5 * s), sg * dk, sg * dk]
        cyf = [2 * s, -3 * s, 0, 3 * s, 5 * s]
        rxf = [14 * s, 13 * s, 15 * s, 40 * s, 36 * s]
        ryf = [14 * s, 13 * s, 15 * s, 30 * s, 26 * s]
        bones.append((FEMUR, *_solid(x, y, z, zf, cxf, cyf, rxf, ryf, cort)))
        # tibia: plateau, shaft, distal flare
        zt = [zk - 5 * s, zk - 40 * s, zk - 95 * s, za + 40 * s, za]
        cxt = [sg * dk] * 5
        cyt = [3 * s, 0, -2 * s, 0, 2 * s]
        rxt = [38 * s, 30 * s, 13 * s, 13 * s, 22 * s]
        ryt = [27 * s, 22 * s, 12 * s, 12 * s, 17 * s]
        bones.append((TIBIA, *_solid(x, y, z, zt, cxt, cyt, rxt, ryt, cort)))
        # fibula: lateral and posterior to the tibia, thin, with head and malleolus
        zfi = [zk - 18 * s, zk - 40 * s, zk - 60 * s, za + 30 * s, za - 15 * s]
        cxfi = [sg * (dk + 30 * s), sg * (dk + 30 * s), sg * (dk + 27 * s), sg * (dk + 24 * s), sg * (dk + 26 * s)]
        cyfi = [16 * s, 16 * s, 14 * s, 10 * s, 12 * s]
        rfi = [9 * s, 9 * s, 6 * s, 6 * s, 9 * s]
        bones.append((FIBULA, *_solid(x, y, z, zfi, cxfi, cyfi, rfi, rfi, min(cort, 2.0 * s))))
        # the limb around them: thigh then lower leg
        zl = [zh - 20 * s, zk + 40 * s, zk - 20 * s, za + 30 * s, za - 40 * s]
        cxl = [sg * (dh + 20 * s), sg * (dk + 8 * s), sg * (dk + 8 * s), sg * (dk + 10 * s), sg * (dk + 10 * s)]
        cyl = [0, 0, 12 * s, 15 * s, 10 * s]
        rl = np.array([80 * s, 55 * s, 52 * s, 32 * s, 30 * s])
        for grow, target in ((0.0, outline), (-1.5, skin_core), (-fat, muscle_region)):
            rho, _ = _tube(x, y, z, zl, cxl, cyl, rl + grow, (rl + grow) * 0.9)
            target |= rho <= 1
        # intermuscular fat septa
        for k, (a0, a1) in enumerate(((-2.5, -1.2), (0.6, 2.2))):
            septa |= _ring(x, y, z, zl, cxl, cyl, rl * (0.55 + 0.1 * k), rl * 0.5, 1.8, 0.0, (a0, a1))[0]

    # ---- compose intensities, outermost first
    tex = _texture(x, y, z, anat.texture_seed, 0.05)
    img[outline] = tone["skin"]
    img[skin_core] = tone["fat"]
    img[muscle_region] = tone["muscle"]
    img[muscle_region & septa] = tone["fat"]
    img[viscera & muscle_region] = tone["viscera"]
    img += np.where(muscle_region, tex, 0.0)
    for value, inside, marrow in bones:
        inside = inside & outline
        img[inside] = tone["cortex"]
        img[marrow & outline] = tone["marrow"] + tex[marrow & outline]
        lab[inside] = value
    # multiplicative smooth bias field
    b = anat.bias
    if any(b):
        field_ = np.exp(b[0] * x0 / 200 + b[1] * y0 / 200 + b[2] * z / 500
                        + b[3] * (x0 / 200) ** 2 + b[4] * (y0 / 200) ** 2)
        img = img * field_
    return img.astype(np.float32), lab


# --------------------------------------------------------------------------------------------- phantom
@dataclass(frozen=True)
class Phantom:
    anatomy: Anatomy
    geometry: Geometry
    image: np.ndarray  # (n_slices, rows, cols) uint16 as stored
    labels: np.ndarray  # (n_slices, rows, cols) uint8 ground truth


def render(anat: Anatomy, geom: Geometry, seed: int = 0) -> Phantom:
    """Render a phantom on ``geom``: Rician noise, then scaled to 12-bit unsigned like a scanner writes."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((geom.n_slices, geom.rows, geom.cols), dtype=np.float32)
    labs = np.empty((geom.n_slices, geom.rows, geom.cols), dtype=np.uint8)
    for k in range(geom.n_slices):
        x, y, z = geom.world_coords(k)
        im, lb = render_points(anat, x, y, z)
        n1 = rng.normal(scale=anat.noise, size=im.shape)
        n2 = rng.normal(scale=anat.noise, size=im.shape)
        imgs[k] = np.sqrt((im + n1) ** 2 + n2**2)
        labs[k] = lb
    scaled = np.clip(imgs * 3000.0, 0, 4095).astype(np.uint16)
    return Phantom(anat, geom, scaled, labs)


def random_anatomy(rng: np.random.Generator, wide: bool = False, harsh: bool = False) -> Anatomy:
    """Random body, pose and contrast.

    ``wide`` widens the pose (position, rotation) beyond training; ``harsh`` also widens body size, noise
    and bias field (a robustness check beyond what the demo model was trained for).
    """
    w = 1.5 if wide or harsh else 1.0
    h = 1.5 if harsh else 1.0
    fat = rng.uniform(0.8, 1.0)
    muscle = rng.uniform(0.25, 0.45)
    return Anatomy(
        scale=float(rng.uniform(0.6 - 0.05 * (h - 1) * 2, 1.0 + 0.05 * (h - 1) * 2)),
        yaw_deg=float(rng.uniform(-8, 8) * w),
        shift=(float(rng.uniform(-20, 20) * w), float(rng.uniform(-15, 15) * w), 0.0),
        leg_spread=float(rng.uniform(-10, 25)),
        fat_mm=float(rng.uniform(5, 18)),
        cortex_mm=float(rng.uniform(2.0, 3.5)),
        intensities={
            "fat": fat,
            "muscle": muscle,
            "cortex": float(rng.uniform(0.02, 0.1)),
            "marrow": float(rng.uniform(max(muscle + 0.12, 0.45), 0.85)),
            "skin": float(rng.uniform(0.45, 0.65)),
            "viscera": float(rng.uniform(0.3, 0.6)),
        },
        noise=float(rng.uniform(0.01, 0.045) * (1.2 if harsh else 1.0)),
        bias=tuple(float(v) for v in rng.normal(scale=0.15 * h, size=5)),
        texture_seed=int(rng.integers(1 << 30)),
    )


def random_geometry(
    rng: np.random.Generator,
    anat: Anatomy,
    wide: bool = False,
    n_slices: int | None = None,
    full_length: bool = True,
) -> Geometry:
    """Random axial acquisition: in-plane size and spacing, slice thickness, FOV and z coverage.

    ``wide`` reaches outside the training ranges (held-out evaluation), including a FOV that clips the body.
    """
    w = 1.4 if wide else 1.0
    ps = float(rng.uniform(0.9 / w, 1.6 * w))
    thick = float(rng.uniform(3.0, 6.0 * w))
    body_w = 2 * (85 * anat.scale + 85 * anat.scale) + 40
    fov_x = body_w * float(rng.uniform(1.05 - 0.2 * (w - 1), 1.35 * w))
    cols = int(np.clip(round(fov_x / ps / 2) * 2, 96, 512))
    rows = int(np.clip(round(cols * rng.uniform(0.55, 0.8)), 64, 512))
    top, bottom = anat.z_extent
    if n_slices is None:
        if full_length:
            n_slices = int((top - bottom) / thick)
            z0 = top
        else:
            n_slices = int(rng.integers(20, 60))
            z0 = float(rng.uniform(bottom + n_slices * thick, top))
    else:
        z0 = float(rng.uniform(bottom + n_slices * thick, top)) if (top - bottom) > n_slices * thick else top
    cx = anat.shift[0] + float(rng.uniform(-15, 15))
    cy = anat.shift[1] + 15 * anat.scale + float(rng.uniform(-15, 15))
    origin = (cx - (cols - 1) / 2 * ps, cy - (rows - 1) / 2 * ps, z0 + anat.shift[2])
    return Geometry(rows, cols, n_slices, (ps, ps), origin, slice_step=(0.0, 0.0, -thick), slice_thickness=thick)


def make_case(seed: int, wide: bool = False, harsh: bool = False, **geom_kwargs) -> Phantom:
    """One random case; ``wide``: geometry (FOV, spacing, thickness, position) wider than training."""
    rng = np.random.default_rng(seed)
    anat = random_anatomy(rng, wide, harsh)
    geom = random_geometry(rng, anat, wide or harsh, **geom_kwargs)
    return render(anat, geom, seed=seed)


def small_series(seed: int = 0, n_slices: int = 24, size: int = 128, legs: str = "both",
                 region: str = "thigh-knee", thickness: float = 8.0, sacrum_is_pelvis: bool = False) -> Phantom:
    """A small, quick phantom for tests: ``size``² pixels covering both legs, ``n_slices`` slices."""
    rng = np.random.default_rng(seed)
    anat = replace(random_anatomy(rng), legs=legs, yaw_deg=4.0, shift=(6.0, -4.0, 0.0),
                   sacrum_is_pelvis=sacrum_is_pelvis)
    ps = (2 * (170 * anat.scale) + 60) / size
    top = {"pelvis": anat.z_extent[0] - 20, "thigh-knee": anat.z_knee + 120, "leg": anat.z_knee - 10}[region]
    geom = Geometry(size, size, n_slices, (ps, ps), (-(size - 1) / 2 * ps, 15 * anat.scale - (size - 1) / 2 * ps, top),
                    slice_step=(0.0, 0.0, -thickness), slice_thickness=thickness)
    return render(anat, geom, seed=seed)
