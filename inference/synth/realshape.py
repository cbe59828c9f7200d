"""Random label maps around real bone shapes (the paediatric shape model), in generation labels.

Why: the network learnt the bones ``labelmap`` draws by formula and fails on real ones (a tibial plateau
called femur, the iliac wings and ischium missed, the sacrum called pelvis). Here pelvis, femur, tibia and
fibula are shapes sampled from the shape model (``ssm``: per-case coefficients, extremes beyond ±2 SD,
both sides, mirrored half the time, flexed at hip and knee, legs apart or touching, yawed) and everything
else is built around them, so it follows the real anatomy rather than a template:

- bones the network must *not* label (generation labels OTHER_*): sacrum and coccyx between the
  sacro-iliac joints found on the hip bones, lumbar vertebrae with discs above it, patellae in front of the
  trochlea, talus, calcaneus and forefoot below the ankle;
- physes (growth plates), labelled as the bone they belong to but with their own generation label (so the
  painter gives them cartilage signal): distal femur, femoral head, both ends of tibia and fibula, and the
  triradiate cartilage of the acetabulum;
- soft tissue from distances to the bones: muscle within a random, angle- and height-dependent distance of
  each leg's bones (thick thigh, thin knee, posterior calf), a trunk around the pelvic ring with pelvic
  contents (viscera, a bladder), muscle groups split by septa, vessels, subcutaneous fat and skin;
- a random field of view: whole leg, pelvis, hips and thighs, knee, calf, or one leg only.

Maps come out exactly as ``labelmap.generate`` gives them — (z, y, x) uint8, superior slice first, rows
toward posterior, columns toward the patient's left — so the renderer and trainer take them unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from . import labels as L
from . import ssm

REGIONS = ("full", "pelvis", "hips_thighs", "knee", "calf", "one_leg")
#: seeds from here on are kept for the independent stand-in (bench/standin_realshape.py): never trained on
HELD_OUT_SEEDS = 900000
_MODELS: dict[str, ssm.ShapeModel] = {}


def models() -> dict[str, ssm.ShapeModel]:
    """Both sides' shape models, loaded once per process (fetched into the cache on first use)."""
    if not _MODELS:
        _MODELS.update({s: ssm.load(s) for s in ssm.SIDES})
    return _MODELS


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _harm(rng: np.random.Generator, amp: float, kmax: int = 4) -> np.ndarray:
    ks = np.arange(1, kmax + 1)
    return np.stack([ks, rng.uniform(0, amp, kmax) / ks, rng.uniform(0, 2 * np.pi, kmax)], 1)


def _harm_eval(h: np.ndarray, th: np.ndarray) -> np.ndarray:
    out = np.zeros_like(th)
    for k, a, ph in h:
        out += a * np.cos(k * th + ph)
    return out


class Ellipsoid:
    """A solid ellipsoid (centre, semi-axes, rotation) cut by axial planes."""

    def __init__(self, c, axes, rot: np.ndarray | None = None):
        self.c, self.ax = np.asarray(c, float), np.asarray(axes, float)
        self.r = np.eye(3) if rot is None else rot
        self.reach = float(self.ax.max())

    def depth(self, X: np.ndarray, Y: np.ndarray, z: float) -> np.ndarray:
        """> 0 inside (1 at the centre), approximately the fraction of the semi-axis to the surface."""
        p = np.stack([X - self.c[0], Y - self.c[1], np.full_like(X, z - self.c[2])], -1) @ self.r
        return 1.0 - np.sqrt(((p / self.ax) ** 2).sum(-1))


class Scene:
    """One random case: posed bones, the extra (unsegmented) bones, physes, and soft-tissue parameters."""

    def __init__(self, rng: np.random.Generator, legs: tuple[str, ...] = ssm.SIDES):
        self.rng = rng
        b = ssm.draw_b(rng, sd_scale=_u(rng, 0.8, 1.2), extreme_p=0.2)
        b[0] = np.clip(b[0], -3.0, 2.5)  # mode 1 is size: beyond these the shapes are no longer children
        self.sk = ssm.posed_skeleton(models(), b, rng, legs=legs, mirror=bool(rng.random() < 0.5))
        self.b = b
        self.meshes = [(k, s, v, f, float(v[:, 2].min()), float(v[:, 2].max())) for k, s, v, f in self.sk.meshes()]
        femurs = [leg.femur for leg in self.sk.legs.values()]
        self.lf = float(np.mean([np.ptp(f[:, 2]) for f in femurs])) if femurs else 350.0
        hips = np.concatenate(list(self.sk.hips.values()))
        self.pel_lo, self.pel_hi = hips.min(0), hips.max(0)
        self.extra = self._extra_bones(hips)
        self.physes = self._physes(young=bool(b[0] < 1.0 and rng.random() < 0.85) or rng.random() < 0.2)
        lf = self.lf
        self.muscularity = _u(rng, 0.65, 1.35)
        self.fat = _u(rng, 0.008, 0.07) * lf + 1.0
        self.skin = _u(rng, 1.0, 3.0)
        self.limb_h = {s: _harm(rng, _u(rng, 0.05, 0.35)) for s in ssm.SIDES}
        self.trunk_m = _u(rng, 0.04, 0.11) * lf
        self.trunk_shape = (_u(rng, 0.85, 1.15), _u(rng, 0.9, 1.3), _u(rng, 0.0, 1.0))
        self.trunk_h = _harm(rng, _u(rng, 0.0, 0.15))
        self.sectors = {s: np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 6)))) for s in ssm.SIDES}
        self.sector_labels = {s: rng.choice(L.MUSCLES, len(self.sectors[s])) for s in ssm.SIDES}
        self.septum = _u(rng, 0.6, 2.5)
        self.vessels = [(_u(rng, 0, 2 * np.pi), _u(rng, 0.25, 0.85), _u(rng, 1.5, 5.0) * lf / 400)
                        for _ in range(int(rng.integers(1, 5)))]
        self.bladder = Ellipsoid([0, self.pel_lo[1] + _u(rng, 0.15, 0.35) * np.ptp(hips[:, 1]),
                                  self.pel_lo[2] + _u(rng, 0.2, 0.45) * np.ptp(hips[:, 2])],
                                 np.array([_u(rng, 0.08, 0.16), _u(rng, 0.06, 0.12), _u(rng, 0.06, 0.14)]) * lf)
        self.cortex_f = {k: _u(rng, 0.15, 0.35) for k in ("femur", "tibia", "fibula")}
        self.cortex_p = _u(rng, 0.7, 2.2)

    # ------------------------------------------------------------------ unsegmented bones
    def _extra_bones(self, hips: np.ndarray) -> list[tuple[Ellipsoid, int, int]]:
        """(ellipsoid, cortex label, marrow label) of sacrum, coccyx, lumbar spine, patellae and feet."""
        rng, lf = self.rng, self.lf
        out: list[tuple[Ellipsoid, int, int]] = []
        # sacro-iliac joints: the medial-most of the posterior hip-bone vertices in the upper half
        ylo, yhi = self.pel_lo[1], self.pel_hi[1]
        zlo, zhi = self.pel_lo[2], self.pel_hi[2]
        post = hips[(hips[:, 1] > yhi - 0.3 * (yhi - ylo)) & (hips[:, 2] > zlo + 0.45 * (zhi - zlo))]
        if len(post) < 10:
            return out
        half = float(np.percentile(np.abs(post[:, 0]), 5))
        near = post[np.abs(post[:, 0]) < half + 12]
        y_si, z_top, z_si_lo = float(near[:, 1].mean()), float(near[:, 2].max()), float(near[:, 2].min())
        sac_len = (z_top - z_si_lo) * _u(rng, 1.7, 2.3)
        n = 6
        tilt = _u(rng, 0.2, 0.6)  # sacral curvature: lower segments more posterior, then forward
        for k in range(n):
            t = k / (n - 1)
            w = half * (1 - 0.8 * t) + 2
            y = y_si - 0.15 * half + tilt * half * np.sin(np.pi * t * 0.8)
            z = z_top - 0.05 * sac_len - t * sac_len * 0.85
            e = Ellipsoid([0, y, z], [w, 0.32 * w + 4, 0.12 * sac_len + 4])
            out.append((e, L.OTHER_CORTEX, L.OTHER_MARROW))
        # lumbar vertebrae with discs: bodies anterior to the canal, spinous processes behind
        vb = 0.045 * lf + 6
        step = 2.2 * vb * _u(rng, 0.9, 1.1)
        for k in range(4):
            z = z_top + 0.6 * vb + k * step
            y = y_si - 0.2 * half - 0.05 * k * half
            out.append((Ellipsoid([0, y, z], [1.5 * vb, 1.1 * vb, 0.85 * vb]), L.OTHER_CORTEX, L.OTHER_MARROW))
            out.append((Ellipsoid([0, y, z + 0.5 * step], [1.4 * vb, 1.0 * vb, 0.17 * step]), L.FLUID, L.FLUID))
            out.append((Ellipsoid([0, y + 1.9 * vb, z], [0.35 * vb, 1.0 * vb, 0.5 * vb]), L.OTHER_CORTEX,
                        L.OTHER_MARROW))
        for leg in self.sk.legs.values():
            fem = leg.femur
            pz = leg.knee_centre[2] + _u(rng, 0.04, 0.11) * lf
            band = fem[np.abs(fem[:, 2] - pz) < 12]
            if len(band):
                ant = band[np.argmin(band[:, 1])]
                pr = _u(rng, 0.05, 0.07) * lf
                c = [ant[0] + _u(rng, -0.2, 0.2) * pr, ant[1] - _u(rng, 0.4, 0.6) * pr - 2, pz]
                out.append((Ellipsoid(c, [pr, 0.45 * pr, 1.15 * pr]), L.OTHER_CORTEX, L.OTHER_MARROW))
            tib = leg.tibia
            low = tib[tib[:, 2] < tib[:, 2].min() + 10].mean(0)
            ta = 0.065 * lf
            out.append((Ellipsoid(low + [0, 0, -0.8 * ta], [ta, 1.1 * ta, 0.6 * ta]), L.OTHER_CORTEX, L.OTHER_MARROW))
            out.append((Ellipsoid(low + [0, 0.9 * ta, -1.9 * ta], [0.8 * ta, 1.6 * ta, 0.9 * ta]), L.OTHER_CORTEX,
                        L.OTHER_MARROW))
            for k in range(3):  # midfoot and metatarsals, running forward
                out.append((Ellipsoid(low + [0, -(1.4 + 1.3 * k) * ta, -(1.6 + 0.3 * k) * ta],
                                      [(1.3 - 0.15 * k) * ta, 0.75 * ta, 0.45 * ta]), L.OTHER_CORTEX, L.OTHER_MARROW))
        return out

    # ------------------------------------------------------------------ growth plates
    def _physes(self, young: bool) -> list[dict]:
        """Plates (bone kind, side, centre, unit normal, half thickness, radius) across the bone ends."""
        if not young:
            return []
        rng, out = self.rng, []
        t = _u(rng, 0.6, 1.8)  # half thickness (mm)
        for side, leg in self.sk.legs.items():
            for kind, ends in (("femur", ("lo",)), ("tibia", ("hi", "lo")), ("fibula", ("hi", "lo"))):
                v = getattr(leg, kind)
                c0 = v.mean(0)
                axis = np.linalg.svd(v - c0, full_matrices=False)[2][0]
                axis = axis if axis[2] > 0 else -axis
                s = (v - c0) @ axis
                length = float(np.ptp(s))
                for end in ends:
                    frac = {"femur": (0.07, 0.12), "tibia": (0.05, 0.09), "fibula": (0.05, 0.09)}[kind]
                    d = _u(rng, *frac) * length
                    s_p = (s.max() - d) if end == "hi" else (s.min() + d)
                    out.append({"kind": kind, "side": side, "c": c0 + s_p * axis, "n": axis, "t": t,
                                "r": 0.25 * length, "wave": _u(rng, 0.0, 0.05)})
            # capital femoral physis: across the head, normal along the neck
            hc, r = leg.hip_centre, leg.head_radius
            fem = leg.femur
            dist = np.linalg.norm(fem - hc, axis=1)
            neck = fem[(dist > 1.2 * r) & (dist < 2.2 * r)]
            if len(neck):
                n = hc - neck.mean(0)
                n /= np.linalg.norm(n)
                out.append({"kind": "femur", "side": side, "c": hc - _u(rng, 0.2, 0.5) * r * n, "n": n, "t": t,
                            "r": 1.3 * r, "wave": 0.0})
            # triradiate cartilage: three half-planes through the acetabular centre, in the sagittal plane
            sg = -1.0 if side == "right" else 1.0
            ac = hc - [sg * 0.45 * r, 0, 0]
            th0 = _u(rng, -0.35, 0.35)
            for k in range(3):
                a = th0 + np.pi / 2 + k * 2 * np.pi / 3
                out.append({"kind": "pelvis", "side": side, "c": ac, "dir": np.array([0, -np.sin(a), np.cos(a)]),
                            "t": t, "r": 1.5 * r})
        return out

    # ------------------------------------------------------------------ one plane
    def plane(self, z: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        xs, ys = X[0], Y[:, 0]
        ps = float(xs[1] - xs[0])
        lab = np.zeros(X.shape, np.uint8)
        bones: list[tuple[str, str, np.ndarray]] = []
        for kind, side, v, f, lo, hi in self.meshes:
            if lo <= z <= hi:
                m = ssm.voxelise_slice(v, f, z, xs, ys)
                if m.any():
                    bones.append((kind, side, m))
        extra = np.zeros(X.shape, np.uint8)
        for e, c_lab, m_lab in self.extra:
            if abs(z - e.c[2]) < e.reach:
                d = e.depth(X, Y, z)
                if (d > 0).any():
                    th = 1.8 / max(float(e.ax[:2].min()), 1.0)
                    extra[d > 0] = c_lab
                    extra[d > th] = m_lab
        bone_any = np.zeros(X.shape, bool)
        leg_bones = {s: np.zeros(X.shape, bool) for s in ssm.SIDES}
        for kind, side, m in bones:
            bone_any |= m
            if kind != "pelvis":
                leg_bones[side] |= m
        all_hard = bone_any | (extra > 0)
        self._soft(z, X, Y, lab, bones, leg_bones, all_hard, ps)
        lab[extra > 0] = extra[extra > 0]
        for kind, side, m in bones:
            self._bone(z, X, Y, lab, kind, side, m, ps)
        return lab

    def _soft(self, z, X, Y, lab, bones, leg_bones, hard, ps) -> None:
        lf, mu = self.lf, self.muscularity
        muscle = np.zeros(X.shape, bool)
        owner = np.full(X.shape, -1, np.int8)  # which leg's sectors paint the muscle
        best = np.full(X.shape, np.inf)
        centres = {}
        for i, side in enumerate(ssm.SIDES):
            leg = self.sk.legs.get(side)
            if leg is None:
                continue
            mask = leg_bones[side] | self._near_extra(X, Y, z, leg)
            if not mask.any():
                continue
            d = ndimage.distance_transform_edt(~mask, sampling=ps)
            yy, xx = np.nonzero(mask)
            cx, cy = float(X[0, xx].mean()), float(Y[yy, 0].mean())
            centres[side] = (cx, cy)
            kz = [leg.ankle_centre[2] - 0.15 * lf, leg.ankle_centre[2], leg.knee_centre[2] - 0.3 * lf,
                  leg.knee_centre[2], leg.knee_centre[2] + 0.2 * lf, leg.hip_centre[2]]
            base = np.interp(z, kz, [0.02, 0.012, 0.05, 0.03, 0.1, 0.16]) * lf * mu
            post = np.interp(z, kz, [0.0, 0.03, 0.1, 0.02, 0.03, 0.04]) * lf * mu
            sg = -1.0 if side == "right" else 1.0
            th = np.arctan2(Y - cy, (X - cx) * sg)  # 0 lateral, +pi/2 posterior
            reach = base * (1 + _harm_eval(self.limb_h[side], th)) + post * np.clip(np.sin(th), 0, 1) ** 1.5
            inside = d < np.maximum(reach, 2.0)
            muscle |= inside
            closer = inside & (d < best)
            owner[closer] = i
            best = np.where(closer, d, best)
        trunk = np.zeros(X.shape, bool)
        cavity = np.zeros(X.shape, bool)
        hz = max((leg.hip_centre[2] for leg in self.sk.legs.values()), default=self.pel_lo[2])
        if z > hz - 0.15 * lf and hard.any():
            # the trunk: the bones' convex hull grown by the trunk muscles (psoas, glutei, abdominal wall),
            # joined to a rounded outline over the pelvis (paraspinal and gluteal bulk behind the sacrum)
            hull = _hull_mask(hard, X, Y)
            dist_out = ndimage.distance_transform_edt(~hull, sampling=ps)
            trunk = dist_out < self.trunk_m
            lo, hi = self.pel_lo, self.pel_hi
            f = float(np.clip((z - (hz - 0.15 * lf)) / (0.1 * lf), 0.0, 1.0))  # fades in below the hips
            rx = (0.5 * (hi[0] - lo[0]) * self.trunk_shape[0] + 0.5 * self.trunk_m) * (0.6 + 0.4 * f)
            ry = 0.5 * (hi[1] - lo[1]) * self.trunk_shape[1] + self.trunk_m
            cy = 0.5 * (lo[1] + hi[1]) + self.trunk_shape[2] * self.trunk_m
            th = np.arctan2(Y - cy, X)
            rr = np.hypot(X / rx, (Y - cy) / ry) / (1 + _harm_eval(self.trunk_h, th))
            if f > 0:
                trunk |= rr < 1.0
            d_bone = ndimage.distance_transform_edt(~hard, sampling=ps)
            cavity = (hull | (rr < 0.75)) & (d_bone > 0.03 * lf) & \
                (z > lo[2] + 0.1 * (hi[2] - lo[2]))
        body_core = muscle | trunk | hard
        if not body_core.any():
            return
        d_out = ndimage.distance_transform_edt(~body_core, sampling=ps)
        body = d_out < self.fat
        lab[body] = L.FAT
        depth = ndimage.distance_transform_edt(body, sampling=ps)
        lab[body & (depth <= max(self.skin, 1.01 * ps))] = L.SKIN
        mus = body_core & (depth > max(self.skin, 1.01 * ps))
        lab[mus] = L.MUSCLE_A
        # muscle groups by sector about each leg's bones, septa on the sector borders
        for i, side in enumerate(ssm.SIDES):
            if side not in centres:
                continue
            cx, cy = centres[side]
            sel = mus & ((owner == i) | ((owner < 0) & (np.sign(X) == (-1 if side == "right" else 1))))
            if not sel.any():
                continue
            sg = -1.0 if side == "right" else 1.0
            th = np.mod(np.arctan2(Y[sel] - cy, (X[sel] - cx) * sg), 2 * np.pi)
            rho = np.hypot(X[sel] - cx, Y[sel] - cy)
            sect = np.searchsorted(self.sectors[side], th) % len(self.sectors[side])
            vals = np.asarray(self.sector_labels[side], np.uint8)[sect]
            ang = np.full(th.shape, np.inf)
            for bnd in self.sectors[side]:
                ang = np.minimum(ang, np.abs(np.mod(th - bnd + np.pi, 2 * np.pi) - np.pi))
            vals[(ang * rho < self.septum / 2) & (rho > 0.04 * self.lf)] = L.SEPTUM
            lab[sel] = vals
            for a, f, rv in self.vessels:
                leg = self.sk.legs[side]
                if not leg.ankle_centre[2] <= z <= leg.hip_centre[2]:
                    continue
                r_at = 0.12 * self.lf * f + 6
                vx, vy = cx + sg * np.cos(a) * r_at, cy + np.sin(a) * r_at
                lab[mus & (np.hypot(X - vx, Y - vy) < rv)] = L.VESSEL
        if cavity.any():
            lab[cavity & mus] = L.VISCERA
            b = self.bladder
            if abs(z - b.c[2]) < b.reach:
                lab[cavity & (b.depth(X, Y, z) > 0)] = L.FLUID

    def _near_extra(self, X, Y, z, leg: ssm.Leg) -> np.ndarray:
        """Foot and patella of this leg count as its bones for the soft tissue around them."""
        out = np.zeros(X.shape, bool)
        for e, _, _ in self.extra:
            own = abs(e.c[0] - leg.knee_centre[0]) < 0.25 * self.lf and e.c[2] < leg.hip_centre[2] - 0.2 * self.lf
            if own and abs(z - e.c[2]) < e.reach:
                out |= e.depth(X, Y, z) > 0
        return out

    def _bone(self, z, X, Y, lab, kind, side, m, ps) -> None:
        c_lab, m_lab = L.BONE[kind]
        depth = ndimage.distance_transform_edt(np.pad(m, 1), sampling=ps)[1:-1, 1:-1]
        if kind == "pelvis":
            t = max(self.cortex_p, 1.01 * ps)
        else:
            r_eq = np.sqrt(m.sum() * ps * ps / np.pi)
            r_min = {"femur": 0.022, "tibia": 0.02, "fibula": 0.008}[kind] * self.lf / 0.95 + 1
            t = float(np.clip(self.cortex_f[kind] * r_min * min(1.0, (r_min / max(r_eq, 1e-3)) ** 2), 1.01 * ps, 6.0))
        lab[m] = c_lab
        lab[m & (depth > t)] = m_lab
        ph_lab = L.PHYSIS[kind]
        for p in self.physes:
            if p["kind"] != kind or p["side"] != side:
                continue
            c = p["c"]
            if abs(z - c[2]) > p["r"] + p["t"]:
                continue
            dx, dy, dz = X - c[0], Y - c[1], z - c[2]
            near = m & (dx**2 + dy**2 + dz**2 < p["r"] ** 2)
            if not near.any():
                continue
            if "dir" in p:  # a half-plane containing the x axis
                d = p["dir"]
                along = dy * d[1] + dz * d[2]
                perp = np.abs(-dy * d[2] + dz * d[1])
                lab[near & (along > 0) & (perp < p["t"])] = ph_lab
            else:
                n = p["n"]
                s = dx * n[0] + dy * n[1] + dz * n[2]
                wave = p["wave"] * p["r"] * np.cos(2 * np.arctan2(dy, dx))
                lab[near & (np.abs(s - wave) < p["t"])] = ph_lab


def _hull_mask(mask: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Filled convex hull of a pixel mask (scan-line fill of the hull polygon)."""
    yy, xx = np.nonzero(mask)
    pts = np.c_[X[0, xx], Y[yy, 0]]
    if len(pts) < 3:
        return mask.copy()
    try:
        h = ConvexHull(pts)
    except QhullError:
        return mask.copy()
    poly = pts[h.vertices]
    seg = np.stack([poly, np.roll(poly, -1, axis=0)], 1)
    return ssm.fill_section(seg, X[0], Y[:, 0]) | mask


def _z_range(sc: Scene, region: str, rng: np.random.Generator) -> tuple[float, float]:
    lf = sc.lf
    legs = list(sc.sk.legs.values())
    top = float(sc.pel_hi[2]) + _u(rng, 5, 40)
    hip = max(leg.hip_centre[2] for leg in legs)
    knee = float(np.mean([leg.knee_centre[2] for leg in legs]))
    ankle = min(leg.ankle_centre[2] for leg in legs)
    bottom = ankle - _u(rng, 0.05, 0.2) * lf
    if region == "pelvis":
        return top, hip - _u(rng, 0.15, 0.3) * lf
    if region == "hips_thighs":
        return top - _u(rng, 0, 0.3) * lf, knee - _u(rng, -0.1, 0.2) * lf
    if region == "knee":
        return knee + _u(rng, 0.15, 0.4) * lf, knee - _u(rng, 0.15, 0.4) * lf
    if region == "calf":
        return knee + _u(rng, -0.05, 0.15) * lf, bottom
    return top, bottom


def generate(seed: int, size: int = 256, dz: float = 3.0, region: str | None = None) -> tuple[np.ndarray, dict]:
    """One random label map (nz, size, size) uint8 in generation labels around real bone shapes, superior
    slice first, and its metadata (as ``labelmap.generate``). ``region`` None: whole leg a third of the
    time, else a random partial field of view."""
    if not 0 <= seed < HELD_OUT_SEEDS:
        raise ValueError(f"realshape seeds must lie in 0..{HELD_OUT_SEEDS - 1}; the rest are held out for testing")
    rng = np.random.default_rng(seed)
    if region is None:
        region = "full" if rng.random() < 0.33 else str(rng.choice(REGIONS[1:]))
    legs = ssm.SIDES if rng.random() < 0.9 else (str(rng.choice(ssm.SIDES)),)
    sc = Scene(rng, legs=legs)
    ztop, zbot = _z_range(sc, region, rng)
    one = region == "one_leg" or len(legs) == 1
    side = str(rng.choice(list(sc.sk.legs))) if region == "one_leg" else None
    pts = [m[2] for m in sc.meshes if side is None or m[1] == side]
    allv = np.concatenate(pts)
    allv = allv[(allv[:, 2] <= ztop + 20) & (allv[:, 2] >= zbot - 20)]
    if len(allv) == 0:
        allv = np.concatenate(pts)
    lo, hi = allv.min(0), allv.max(0)
    margin = (0.17 if not one else 0.14) * sc.lf * sc.muscularity + sc.fat + 10
    width = float(max(hi[0] - lo[0], hi[1] - lo[1]) + 2 * margin) * _u(rng, 1.0, 1.25)
    ps = width / size
    cx, cy = (lo[0] + hi[0]) / 2 + _u(rng, -0.05, 0.05) * width, (lo[1] + hi[1]) / 2 + _u(rng, -0.05, 0.05) * width
    c = (np.arange(size) - (size - 1) / 2) * ps
    X, Y = np.meshgrid(c + cx, c + cy)
    zs = np.arange(ztop, zbot, -dz)
    vol = np.stack([sc.plane(float(z), X, Y) for z in zs])
    return vol, {"seed": seed, "pixel_mm": ps, "slice_mm": dz, "region": region, "legs": list(sc.sk.legs),
                 "b": [round(float(v), 3) for v in sc.b], "physes": bool(sc.physes), "generator": "realshape"}
