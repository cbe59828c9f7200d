"""An independent stand-in for the steering team's kept-back real-shape phantoms (for testing only).

Why: a stand-in that shares bone shapes with the training generator cannot show what a foreign patient's
bones do to the model (the "foreign" family scored 0.86 while real shapes scored 0.08 on the tibia). Here
the bones are real shapes from the paediatric shape model (``inference.synth.ssm``) with coefficients from a
seed range the training generator never uses (900000 + i), plus extreme cases at ±3 SD on the shape modes
and at the ends of the observed size range; everything else is written apart from the training generator
(``inference.synth.realshape``): its own tissue layout (limb and trunk ellipses along the joint centres,
compartments split by fat septa, bladder, rectum, bowel, sacrum, lumbar vertebrae, patellae, tali, physes
as horizontal plates) and a physical intensity model (proton density, T1, T2 and fat fraction per tissue
through spin-echo and Dixon signal equations) instead of random intensities per label.

Acquisition as the steering team describe theirs: axial 448 × 448, 1 mm pixels, 5 mm slices from the ankle
to the iliac crest, partial volume through each slice (five 1 mm planes averaged), coil bias and Rician
noise; contrasts T1, PD, water (Dixon W), T2 and fat (Dixon F). Ground truth: the class filling most of each
voxel. Usage::

    python -m bench.standin_realshape --out /tmp/standin --shapes 0,1,3,6,7 [--contrasts t1,water]
    dicom-node evaluate --model inference/weights/demo-lower-limb.safetensors --data /tmp/standin --out /tmp/ev

Needs the shape model's wheel (fetched once by ``inference.synth.ssm``; see ``docs/model-data.md``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference.phantom import FEMUR, FIBULA, PELVIS, TIBIA, Geometry, Phantom
from inference.phantom_io import write_training_case
from inference.synth import ssm

SEED_BASE = 900000  # the training generator draws shapes from seeds below this
CONTRASTS = ("t1", "pd", "water", "t2", "fat")

# tissues of this stand-in (its own numbering; only CLASS maps them to the segmented classes)
AIR, SKIN, FAT, MUSCLE, SEPTUM, VESSEL, NERVE, BLADDER, RECTUM, BOWEL, CORTEX, MARROW, RED_MARROW, PHYSIS, \
    CARTILAGE, DISC, CSF, TENDON = range(18)
N_TISSUE = 18

#: (proton density, T1 ms, T2 ms, fat fraction) at 1.5 T, rough literature values
PROPS = {
    AIR: (0.0, 1000, 1, 0.0), SKIN: (0.7, 600, 40, 0.2), FAT: (1.0, 260, 80, 0.95), MUSCLE: (0.8, 900, 35, 0.03),
    SEPTUM: (0.9, 300, 70, 0.8), VESSEL: (0.9, 1300, 220, 0.0), NERVE: (0.8, 1000, 70, 0.2),
    BLADDER: (1.0, 3000, 1500, 0.0), RECTUM: (0.5, 900, 60, 0.05), BOWEL: (0.8, 1000, 90, 0.1),
    CORTEX: (0.05, 1000, 1, 0.0), MARROW: (0.95, 300, 70, 0.85), RED_MARROW: (0.9, 600, 60, 0.4),
    PHYSIS: (0.8, 1000, 50, 0.0), CARTILAGE: (0.8, 1000, 45, 0.0), DISC: (0.85, 1100, 110, 0.0),
    CSF: (1.0, 3500, 1800, 0.0), TENDON: (0.2, 500, 3, 0.0),
}
FAT_T1, FAT_T2 = 260.0, 80.0


@dataclass
class Case:
    name: str
    skeleton: ssm.Skeleton
    rng_seed: int
    young: bool


def shape_coefficients(index: int) -> tuple[np.ndarray, str]:
    """Case ``index``: the first six are the extremes, then held-out random draws (SD units)."""
    extremes = [("small", {0: -2.2}), ("large", {0: 1.8}), ("m2p3", {1: 3.0}), ("m2m3", {1: -3.0}),
                ("m3p3", {2: 3.0}), ("m3m3", {2: -3.0})]
    if index < len(extremes):
        b = np.zeros(10)
        name, vals = extremes[index]
        for k, v in vals.items():
            b[k] = v
        return b, name
    rng = np.random.default_rng(SEED_BASE + index)
    return np.clip(rng.normal(0, 1, 10), -2.5, 2.5), f"draw{index}"


def make_skeleton(index: int, models: dict) -> Case:
    b, label = shape_coefficients(index)
    rng = np.random.default_rng(SEED_BASE + 50000 + index)
    for _ in range(40):  # a pose whose bones fit the 448 mm field of view with a margin
        sk = ssm.posed_skeleton(models, b, rng, hip_flex=(0, 6), knee_flex=(0, 6), abduction=(-8, 2), rot=(-6, 6),
                                yaw=(-3, 3), mirror=bool(index % 2))
        lo, hi = sk.bounds()
        if max(-lo[0], hi[0]) < 205:
            break
    return Case(f"sr{index:02d}-{label}", sk, SEED_BASE + 70000 + index, bool(b[0] < 0.8))


def _ellipse(X, Y, cx, cy, rx, ry) -> np.ndarray:
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 < 1.0


def _interp_axis(z: float, pts: list[np.ndarray]) -> np.ndarray:
    """Point on the polyline ``pts`` (ordered superior to inferior) at height z (clamped)."""
    zs = np.array([p[2] for p in pts])[::-1]
    arr = np.array(pts)[::-1]
    return np.array([np.interp(z, zs, arr[:, i]) for i in range(3)])


class Layout:
    """The tissue map of one skeleton on any axial plane (1 mm pixels)."""

    def __init__(self, case: Case, xs: np.ndarray, ys: np.ndarray):
        self.c, self.sk, self.xs, self.ys = case, case.skeleton, xs, ys
        self.X, self.Y = np.meshgrid(xs, ys)
        rng = np.random.default_rng(case.rng_seed)
        self.rng = rng
        hips = np.concatenate(list(self.sk.hips.values()))
        self.pel_lo, self.pel_hi = hips.min(0), hips.max(0)
        legs = self.sk.legs
        self.lf = float(np.mean([np.ptp(leg.femur[:, 2]) for leg in legs.values()]))
        self.fat_mm = rng.uniform(0.02, 0.06) * self.lf
        # sacro-iliac landmarks: medial-most posterior points of the hip bones
        post = hips[hips[:, 1] > self.pel_hi[1] - 0.35 * (self.pel_hi[1] - self.pel_lo[1])]
        self.si_half = float(np.percentile(np.abs(post[:, 0]), 3))
        self.si_y = float(np.median(post[np.abs(post[:, 0]) < self.si_half + 15, 1]))
        zp = post[np.abs(post[:, 0]) < self.si_half + 12, 2]
        self.sac_top, self.sac_bot = float(zp.max()), float(zp.min()) - 0.25 * (zp.max() - zp.min())
        self.marrow_red = rng.uniform(0.0, 0.6) if case.young else 0.0
        self.physis_mm = rng.uniform(1.5, 3.0)
        self.meshes = [(k, s, v, f, v[:, 2].min(), v[:, 2].max()) for k, s, v, f in self.sk.meshes()]

    def bones(self, z: float) -> list[tuple[str, str, np.ndarray]]:
        out = []
        for kind, side, v, f, lo, hi in self.meshes:
            if lo <= z <= hi:
                m = ssm.voxelise_slice(v, f, z, self.xs, self.ys)
                if m.any():
                    out.append((kind, side, m))
        return out

    def plane(self, z: float) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, class) maps of the plane at height z."""
        X, Y = self.X, self.Y
        tis = np.zeros(X.shape, np.uint8)
        cls = np.zeros(X.shape, np.uint8)
        bones = self.bones(z)
        bone_any = np.zeros(X.shape, bool)
        for _, _, m in bones:
            bone_any |= m
        # --- body outline: limb ellipses along hip-knee-ankle, a trunk ellipse at the pelvis
        body = np.zeros(X.shape, bool)
        inner = np.zeros(X.shape, bool)
        lf, fat = self.lf, self.fat_mm
        for side, leg in self.sk.legs.items():
            sg = -1.0 if side == "right" else 1.0
            top = leg.hip_centre + [0, 0, 0.05 * lf]
            bottom = leg.ankle_centre - [0, 0, 0.12 * lf]
            if not bottom[2] <= z <= top[2]:
                continue
            p = _interp_axis(z, [top, leg.knee_centre, leg.ankle_centre, bottom])
            t = np.interp(z, [bottom[2], leg.ankle_centre[2], leg.knee_centre[2] - 0.25 * lf, leg.knee_centre[2],
                              leg.knee_centre[2] + 0.3 * lf, top[2]], [0.085, 0.08, 0.15, 0.12, 0.16, 0.2]) * lf
            below_knee = z < leg.knee_centre[2]
            cx = p[0] + sg * (0.15 if below_knee else -0.05) * t
            cy = p[1] + (0.45 if below_knee else 0.1) * t
            body |= _ellipse(X, Y, cx, cy, t + fat, 0.92 * t + fat)
            inner |= _ellipse(X, Y, cx, cy, t, 0.92 * t)
        hz = np.mean([leg.hip_centre[2] for leg in self.sk.legs.values()]) if self.sk.legs else self.pel_lo[2]
        if z > hz - 0.22 * lf:
            rx = 0.5 * (self.pel_hi[0] - self.pel_lo[0]) + 0.03 * lf
            ry = 0.5 * (self.pel_hi[1] - self.pel_lo[1]) + 0.05 * lf
            cy = 0.5 * (self.pel_hi[1] + self.pel_lo[1]) + 0.05 * lf
            body |= _ellipse(X, Y, 0.0, cy, rx + fat, ry + fat)
            inner |= _ellipse(X, Y, 0.0, cy, rx, ry)
        if bone_any.any():
            inner |= ndimage.maximum_filter(bone_any, size=13)
            body |= ndimage.maximum_filter(inner, size=5)
        skin = body & ~ndimage.binary_erosion(body, iterations=2)
        tis[body] = FAT
        tis[inner] = MUSCLE
        tis[skin] = SKIN
        # intermuscular septa: fat lines radiating from each long bone at fixed anatomical angles
        for kind, side, m in bones:
            if kind not in ("femur", "tibia") or z > self.sk.legs[side].hip_centre[2] - 0.12 * lf:
                continue
            yy, xx = np.nonzero(m)
            bx, by = float(self.xs[xx].mean()), float(self.ys[yy].mean())
            reach = 0.22 * lf
            box = (slice(*np.searchsorted(self.ys, [by - reach, by + reach])),
                   slice(*np.searchsorted(self.xs, [bx - reach, bx + reach])))
            Xb, Yb, inb, tb = X[box], Y[box], inner[box], tis[box]
            sg = -1.0 if side == "right" else 1.0
            ang = np.arctan2(Yb - by, (Xb - bx) * sg)
            rho = np.hypot(Xb - bx, Yb - by)
            for a in ((0.5, 2.2, -2.0) if kind == "femur" else (0.3, 2.6, -1.2)):
                d = np.abs(np.mod(ang - a + np.pi, 2 * np.pi) - np.pi) * rho
                tb[inb & (d < 1.2) & (rho > 12)] = SEPTUM
            # neurovascular bundle: femoral vessels anteromedial, popliteal/tibial posterior
            if kind == "femur":
                off = (-sg * 18.0, -22.0) if z > self.sk.legs[side].knee_centre[2] + 0.25 * lf else (0.0, 28.0)
            else:
                off = (0.0, 25.0)
            tb[inb & (np.hypot(Xb - bx - off[0], Yb - by - off[1]) < 4.0)] = VESSEL
            tb[inb & (np.hypot(Xb - bx - off[0] - 7, Yb - by - off[1]) < 3.0)] = VESSEL
            tb[inb & (np.hypot(Xb - bx - off[0] + 6, Yb - by - off[1] + 5) < 2.5)] = NERVE
        # --- pelvic organs and the spine
        self._pelvic(z, tis, inner)
        # --- bones: cortex shell, marrow, physes; class labels
        for kind, side, m in bones:
            self._bone(z, kind, side, m, tis, cls)
        self._extra_bones(z, tis)
        return tis, cls

    def _pelvic(self, z: float, tis: np.ndarray, inner: np.ndarray) -> None:
        X, Y = self.X, self.Y
        lo, hi = self.pel_lo, self.pel_hi
        h = hi[2] - lo[2]
        w = hi[0] - lo[0]
        zc_bl = lo[2] + 0.3 * h
        rb = 0.13 * w
        if abs(z - zc_bl) < rb:
            r = np.sqrt(rb**2 - (z - zc_bl) ** 2)
            tis[inner & _ellipse(X, Y, 0, lo[1] + 0.25 * (hi[1] - lo[1]), 1.2 * r, r)] = BLADDER
        if lo[2] + 0.05 * h < z < lo[2] + 0.55 * h:
            yc = self.si_y - 0.12 * (hi[1] - lo[1])
            tis[inner & _ellipse(X, Y, 0, yc, 14, 11)] = RECTUM
            tis[inner & _ellipse(X, Y, 0, yc, 6, 4)] = AIR
        if lo[2] + 0.55 * h < z < hi[2]:
            for k in range(5):
                a = 2 * np.pi * k / 5 + 0.3
                loop = _ellipse(X, Y, 0.22 * w * np.cos(a), (lo[1] + hi[1]) / 2 + 0.12 * w * np.sin(a), 16, 12)
                tis[inner & loop] = BOWEL
        # sacrum and coccyx (bone not segmented): a tapering wedge between the sacro-iliac joints
        if self.sac_bot < z < self.sac_top:
            f = (z - self.sac_bot) / (self.sac_top - self.sac_bot)
            half = 8 + (self.si_half + 2 - 8) * f**0.7
            yc = self.si_y + (1 - f) * 10 - 10
            sac = _ellipse(X, Y, 0, yc, half, 0.22 * half + 7)
            tis[sac] = CORTEX
            tis[ndimage.binary_erosion(sac, iterations=2)] = MARROW if not self.marrow_red else RED_MARROW
        # lumbar vertebrae above the sacrum, 28 mm apart with 7 mm discs; spinal canal behind
        if z >= self.sac_top - 5:
            k = (z - self.sac_top) % 28
            yc = self.si_y - 15
            body = _ellipse(X, Y, 0, yc, 0.45 * self.si_half + 8, 0.3 * self.si_half + 6)
            if k < 7:
                tis[body] = DISC
            else:
                tis[body] = CORTEX
                tis[ndimage.binary_erosion(body, iterations=2)] = RED_MARROW
            ry = 0.3 * self.si_half + 6
            tis[_ellipse(X, Y, 0, yc + ry + 9, 9, 7)] = CORTEX
            tis[_ellipse(X, Y, 0, yc + ry + 9, 6, 5)] = CSF
            tis[_ellipse(X, Y, 0, yc + ry + 24, 4, 9)] = CORTEX

    def _bone(self, z: float, kind: str, side: str, m: np.ndarray, tis: np.ndarray, cls: np.ndarray) -> None:
        cortex_mm = {"femur": 3, "tibia": 3, "fibula": 2, "pelvis": 1}[kind]
        area = float(m.sum())
        if kind != "pelvis" and area > {"femur": 900, "tibia": 800, "fibula": 200}[kind] * (self.lf / 395) ** 2:
            cortex_mm = 1  # metaphysis and epiphysis: thin shell
        core = ndimage.binary_erosion(m, iterations=cortex_mm)
        tis[m] = CORTEX
        tis[core] = RED_MARROW if self.marrow_red > 0.3 else MARROW
        cls[m] = {"femur": FEMUR, "tibia": TIBIA, "fibula": FIBULA, "pelvis": PELVIS}[kind]
        if not self.c.young:
            return
        leg = self.sk.legs.get(side)
        half = self.physis_mm / 2
        if kind == "pelvis" and leg is not None:  # triradiate cartilage: plates through the acetabulum's centre
            hc, r = leg.hip_centre, leg.head_radius
            near = np.hypot(self.X - hc[0], self.Y - hc[1]) < 1.5 * r
            if abs(z - hc[2]) < 1.5 * r:
                plate = (np.abs(self.Y - hc[1]) < half) | (abs(z - hc[2] - 0.2 * r) < half)
                tis[m & near & plate & (np.abs(self.X) < np.abs(hc[0]))] = PHYSIS
            return
        if leg is None:
            return
        v = getattr(leg, kind)
        lo, hi = float(v[:, 2].min()), float(v[:, 2].max())
        length = hi - lo
        planes = {"femur": [lo + 0.07 * length], "tibia": [hi - 0.06 * length, lo + 0.05 * length],
                  "fibula": [hi - 0.05 * length, lo + 0.08 * length]}[kind]
        if kind == "femur":  # capital physis: a plate across the head, near the head-neck junction
            hc, r = leg.hip_centre, leg.head_radius
            if abs(z - (hc[2] - 0.35 * r)) < half:
                tis[m & (np.hypot(self.X - hc[0], self.Y - hc[1]) < 1.1 * r)] = PHYSIS
        for zp in planes:
            if abs(z - zp) < half:
                tis[m] = PHYSIS

    def _extra_bones(self, z: float, tis: np.ndarray) -> None:
        """Patellae and tali: bone that is not segmented."""
        X, Y = self.X, self.Y
        for leg in self.sk.legs.values():
            kc = leg.knee_centre
            fem = leg.femur
            pz = kc[2] + 0.07 * self.lf
            hr = 0.06 * self.lf
            if abs(z - pz) < hr:
                r = 0.09 * self.lf * np.sqrt(1 - ((z - pz) / hr) ** 2)
                band = fem[np.abs(fem[:, 2] - pz) < 10]
                ant = float(band[:, 1].min()) if len(band) else kc[1] - 0.08 * self.lf
                px = float(np.median(band[:, 0])) if len(band) else kc[0]
                pat = _ellipse(X, Y, px, ant - 4 - 0.4 * r, r, 0.45 * r)
                tis[pat] = CORTEX
                tis[ndimage.binary_erosion(pat, iterations=1)] = MARROW
                tis[_ellipse(X, Y, px, ant - 1.5, r * 0.9, 1.5) & ~pat] = CARTILAGE
            ac = leg.ankle_centre
            tz = ac[2] - 0.04 * self.lf
            tr = 0.055 * self.lf
            if abs(z - tz) < tr:
                r = 0.07 * self.lf * np.sqrt(1 - ((z - tz) / tr) ** 2)
                tal = _ellipse(X, Y, ac[0], ac[1] - 0.01 * self.lf, 0.9 * r, r)
                tis[tal] = CORTEX
                tis[ndimage.binary_erosion(tal, iterations=1)] = MARROW


# --------------------------------------------------------------------------------------------- signal
def signal_table(contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Signal per tissue from its (PD, T1, T2, fat fraction) through the sequence's equation."""
    out = np.zeros(N_TISSUE)
    if contrast in ("t1", "pd", "t2"):
        tr, te = {"t1": (550, 12), "pd": (3000, 25), "t2": (4000, 90)}[contrast]
        tr *= rng.uniform(0.85, 1.15)
        for t, (pd, t1, t2, ff) in PROPS.items():
            water = pd * (1 - ff) * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
            fat = pd * ff * (1 - np.exp(-tr / FAT_T1)) * np.exp(-te / FAT_T2) * (1.15 if contrast == "t2" else 1.0)
            out[t] = water + fat
    else:  # 3D spoiled gradient echo Dixon, TR 7 ms, 10 degrees
        tr, alpha = 7.0, np.deg2rad(10)
        for t, (pd, t1, _t2, ff) in PROPS.items():
            def spgr(t1_: float) -> float:
                e1 = np.exp(-tr / t1_)
                return float(np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1))
            out[t] = pd * ((1 - ff) * spgr(t1) if contrast == "water" else ff * spgr(FAT_T1))
    out[VESSEL] *= 0.25 if contrast in ("t1", "pd", "t2") else 1.5  # flow void in spin echo, inflow in GRE
    return out / out.max()


def render_case(case: Case, contrasts: tuple[str, ...], size: int = 448, pixel: float = 1.0, slice_mm: float = 5.0,
                sub: int = 5) -> dict[str, Phantom]:
    """One skeleton rendered in each of ``contrasts``: the same anatomy and slices, contrast-specific signal."""
    sk = case.skeleton
    lo, hi = sk.bounds()
    xs = (np.arange(size) - (size - 1) / 2) * pixel
    ycen = float((lo[1] + hi[1]) / 2) + 10
    ys = ycen + (np.arange(size) - (size - 1) / 2) * pixel
    z_top = float(max(v[:, 2].max() for v in sk.hips.values())) + 3
    z_bot = float(min(leg.ankle_centre[2] for leg in sk.legs.values())) - 10
    zs = np.arange(z_top, z_bot, -slice_mm)
    lay = Layout(case, xs, ys)
    rng = np.random.default_rng(case.rng_seed + 1)
    tables = {c: signal_table(c, rng) for c in contrasts}
    imgs = {c: np.zeros((len(zs), size, size), np.float32) for c in contrasts}
    labels = np.zeros((len(zs), size, size), np.uint8)
    offs = ((np.arange(sub) + 0.5) / sub - 0.5) * slice_mm
    for k, z in enumerate(zs):
        counts = np.zeros((5, size, size), np.uint8)
        for o in offs:
            tis, cls = lay.plane(float(z + o))
            for c in contrasts:
                imgs[c][k] += tables[c][tis]
            counts[cls, np.arange(size)[:, None], np.arange(size)[None, :]] += 1
        labels[k] = counts.argmax(0)
        for c in contrasts:
            imgs[c][k] /= sub
    # coil bias: posterior and anterior surface coils, a smooth product field over the volume
    Z, Yg, _ = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)
    bias = (0.75 + 0.45 * np.exp(-((Yg - ys.max()) / 160.0) ** 2) + 0.25 * np.exp(-((Yg - ys.min()) / 140.0) ** 2)
            ) * (1 + 0.08 * np.sin(Z / 150.0 + rng.uniform(0, 6)))
    geom = Geometry(size, size, len(zs), (pixel, pixel), (float(xs[0]), float(ys[0]), float(zs[0])),
                    slice_step=(0.0, 0.0, -slice_mm), slice_thickness=slice_mm)
    out = {}
    for c in contrasts:
        img = imgs[c] * bias
        sd = 0.025 * float(np.percentile(img[img > 0.05], 95)) if (img > 0.05).any() else 0.01
        img = np.sqrt((img + rng.normal(0, sd, img.shape)) ** 2 + rng.normal(0, sd, img.shape) ** 2)
        scaled = np.clip(img / max(float(np.percentile(img, 99.9)), 1e-6) * 3000, 0, 4095).astype(np.uint16)
        out[c] = Phantom(anatomy=None, geometry=geom, image=scaled, labels=labels)  # type: ignore[arg-type]
    return out


def write_standin(root: Path, indices: list[int], contrasts: tuple[str, ...] = CONTRASTS) -> list[str]:
    """Shapes ``indices`` (0-5 the extremes, then held-out draws) in every contrast, in the layout
    ``dicom-node evaluate`` reads."""
    models = {s: ssm.load(s) for s in ssm.SIDES}
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in indices:
        case = make_skeleton(i, models)
        for contrast, ph in render_case(case, contrasts).items():
            name = f"{case.name}-{contrast}"
            write_training_case(ph, root, name, seed=case.rng_seed)
            names.append(name)
    (root / "standin.json").write_text(json.dumps({"generator": "bench.standin_realshape", "cases": names,
                                                   "seed_base": SEED_BASE}, indent=1))
    return names


def contrast_table(report: dict) -> str:
    """Markdown: mean Dice per structure (columns) and contrast (rows) of an ``evaluation.json`` on this stand-in,
    with the worst case per cell, and the number of shapes."""
    names = [k for k in report["summary"] if k != "mean"]
    by: dict[str, list[dict]] = {}
    for row in report["cases"]:
        by.setdefault(row["case"].rsplit("-", 1)[-1], []).append(row)
    lines = ["| contrast | shapes | " + " | ".join(f"{n.lower()} Dice mean (min)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for contrast in [c for c in CONTRASTS if c in by] + sorted(set(by) - set(CONTRASTS)):
        rows = by[contrast]
        cells = []
        for n in names:
            d = np.array([r["structures"][n]["dice"] for r in rows], float)
            cells.append(f"{np.nanmean(d):.2f} ({np.nanmin(d):.2f})" if np.isfinite(d).any() else "–")
        lines.append(f"| {contrast} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.standin_realshape", description=__doc__.split("\n")[0])
    p.add_argument("--table", type=Path, help="print the contrast × structure table of this evaluation.json and stop")
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", default="0,1,3,6,7",
                   help="comma-separated shape indices, each written in every contrast (0-5 are the extremes: "
                        "size -2.2/+1.8 SD, mode 2 +3/-3, mode 3 +3/-3; 6 on are held-out random draws)")
    p.add_argument("--contrasts", default=",".join(CONTRASTS))
    a = p.parse_args(argv)
    if a.table:
        print(contrast_table(json.loads(a.table.read_text())), end="")
        return
    if a.out is None:
        p.error("--out is required")
    contrasts = tuple(c for c in a.contrasts.split(",") if c)
    bad = set(contrasts) - set(CONTRASTS)
    if bad:
        p.error(f"unknown contrast {sorted(bad)}; choose from {','.join(CONTRASTS)}")
    for n in write_standin(a.out, [int(i) for i in a.shapes.split(",") if i], contrasts):
        print(n)


if __name__ == "__main__":
    main()
