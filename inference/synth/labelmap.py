"""Random 3D anatomy label maps of the lower limbs, built from landmarks, in generation labels.

Why another anatomy model when ``inference.phantom`` exists: the demo model learnt the classic phantom's
shapes (elliptic bones, fixed proportions) and its contrast, and fails where a foreign phantom's tibia is
triangular or the pelvis looks different. Here every shape parameter is drawn per map over a wide range:
bone cross-sections are star shapes r(θ) = R(1 + Σ a_k cos(kθ + φ_k)) (circle, ellipse, triangle, irregular),
cortex thickness, bone and leg sizes from small children to adults, tibia/fibula proportions, fibula
position (lateral to posterolateral), legs apart or touching, one leg only, partial z-coverage. The
anatomical order is kept: pelvis above femur above tibia/fibula, the femoral head sits in the acetabulum
behind a fluid gap, the knee has a joint gap, the patella and talus are bone that is *not* segmented.

Maps are stored as (z, y, x) uint8 slices, superior first, rows toward posterior (+y), columns toward the
patient's left (+x): the canonical axial view the model sees. Each slice is computed from 2D formulas
at its z, which keeps generation cheap (a few seconds per full-length map) and easy to parallelise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import labels as L

REGIONS = ("full", "pelvis", "thigh", "knee", "calf")


@dataclass
class Body:
    """Landmarks and shape parameters of one random body (mm; z superior, 0 at the iliac crest)."""

    s: float
    legs: tuple[int, ...]  # +1 left (+x), -1 right
    z_hip: float
    z_knee: float
    z_ankle: float
    z_bot: float
    rh: float  # femoral head radius
    dh: float  # half distance between hip centres
    dk: float  # ... between knees
    da: float  # ... between ankles
    gap_knee: float
    gap_hip: float
    fat: float
    skin: float
    muscularity: float
    body_ry: float
    body_end: float
    rng_params: dict = field(default_factory=dict)

    @property
    def p(self) -> dict:
        return self.rng_params


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _harm(rng: np.random.Generator, amp: float, kmax: int = 5) -> np.ndarray:
    """Random harmonics (k, a_k, φ_k) for k = 2..kmax: small amp = near circle, large = irregular."""
    ks = np.arange(2, kmax + 1)
    return np.stack([ks, rng.uniform(0, amp, len(ks)) / np.sqrt(ks - 1), rng.uniform(0, 2 * np.pi, len(ks))], 1)


def random_body(rng: np.random.Generator) -> Body:
    s = _u(rng, 0.45, 1.15)
    z_hip = -_u(rng, 110, 165) * s
    lf = _u(rng, 370, 480) * s
    lt = lf * _u(rng, 0.72, 0.93)
    z_knee = z_hip - lf
    z_ankle = z_knee - lt
    dh = _u(rng, 72, 98) * s
    dk = _u(rng, 32, 105) * s  # small: knees touching (valgus), large: legs apart
    legs_draw = rng.random()
    legs = (1, -1) if legs_draw < 0.86 else ((1,) if legs_draw < 0.93 else (-1,))
    b = Body(
        s=s, legs=legs, z_hip=z_hip, z_knee=z_knee, z_ankle=z_ankle, z_bot=z_ankle - _u(rng, 25, 60) * s,
        rh=_u(rng, 18, 26) * s, dh=dh, dk=dk, da=dk * _u(rng, 0.8, 1.35), gap_knee=1.0 + _u(rng, 2, 9) * s,
        gap_hip=_u(rng, 1.2, 4.0), fat=_u(rng, 2, 32) * (0.6 + 0.4 * s), skin=_u(rng, 1.0, 3.5),
        muscularity=_u(rng, 0.75, 1.3), body_ry=_u(rng, 80, 118) * s, body_end=z_hip - _u(rng, 35, 85) * s,
    )
    p = b.rng_params
    p["fr"] = _u(rng, 0.8, 1.25)  # femoral shaft radius factor
    p["tr"] = _u(rng, 0.75, 1.3)  # tibial shaft radius factor
    p["fib_ratio"] = _u(rng, 0.28, 0.6)  # fibula / tibia shaft radius
    p["fib_angle"] = (_u(rng, -0.25, 1.1), _u(rng, -0.25, 1.1))  # 0 lateral .. ~1 posterolateral (top, bottom)
    p["fib_gap"] = _u(rng, 0.5, 9) * s
    p["cort_f"] = _u(rng, 0.15, 0.4)  # shaft cortex / radius
    p["cort_t"] = _u(rng, 0.15, 0.4)
    p["cort_fi"] = _u(rng, 0.2, 0.5)
    p["cort_p"] = _u(rng, 0.8, 3.0)  # pelvic cortex (mm)
    tri = _harm(rng, 0.12)
    tri[1] = (3, _u(rng, 0.06, 0.32), 1.5 * np.pi + _u(rng, -0.4, 0.4) if rng.random() < 0.85 else _u(rng, 0, 6.3))
    p["h_tibia"] = tri  # triangular shaft, apex anterior
    p["h_fem"] = _harm(rng, _u(rng, 0.0, 0.25))
    p["h_fib"] = _harm(rng, _u(rng, 0.0, 0.35))
    p["h_limb"] = _harm(rng, _u(rng, 0.0, 0.18))
    p["h_body"] = _harm(rng, _u(rng, 0.0, 0.12))
    p["limb_off"] = (_u(rng, -5, 18) * s, _u(rng, -8, 18) * s)
    p["wiggle"] = (_u(rng, 0, 8) * s, _u(rng, 250, 800), _u(rng, 0, 6.3))
    sect = np.sort(rng.uniform(0, 2 * np.pi, 4))
    p["sectors"] = sect
    p["sector_labels"] = rng.permutation(L.MUSCLES)
    p["septum"] = _u(rng, 0.8, 3.0)
    p["vessels"] = [(_u(rng, 0, 6.3), _u(rng, 0.3, 0.8), _u(rng, 1.5, 5) * s) for _ in range(int(rng.integers(1, 4)))]
    objs = []
    for _ in range(int(rng.integers(0, 4))):
        objs.append((int(rng.choice([L.OBJ_BRIGHT, L.OBJ_DARK])), _u(rng, -1, 1), _u(rng, -1, 1), _u(rng, 0.02, 0.12),
                     _u(rng, 0.02, 0.12), bool(rng.random() < 0.5)))
    if rng.random() < 0.3:  # a table/coil slab behind the body
        objs.append((int(rng.choice([L.OBJ_BRIGHT, L.OBJ_DARK])), 0.0, 0.0, 2.0, _u(rng, 0.01, 0.04), True))
    p["objects"] = objs
    p["table_y"] = b.body_ry * _u(rng, 1.0, 1.35)
    # The ischium and pubis as solid tubes, and the acetabulum's thickness (drawn last, so that every
    # earlier draw of a seed stays what it was). A model trained on the thin obturator ring alone labelled a
    # solid ischial tuberosity beside the femur as femur and missed thick pubic rami: bone shape, not one
    # drawing of it, has to decide. Positions are relative to the hip centre, "medial" toward the midline.
    tubes = rng.random() < 0.75
    p["pelvis_ring"] = (not tubes) or rng.random() < 0.4
    p["pelvis_tubes"] = None if not tubes else {
        "isch_top": (_u(rng, 5, 18) * s, _u(rng, 10, 26) * s, -_u(rng, 0.0, 0.5) * b.rh),
        "isch_bot": (_u(rng, 12, 42) * s, _u(rng, 8, 38) * s, -_u(rng, 55, 100) * s),
        "isch_r": (_u(rng, 9, 17) * s, _u(rng, 9, 22) * s),
        "sym": (_u(rng, 3, 12) * s, -_u(rng, 18, 45) * s, -_u(rng, 15, 55) * s),  # from the midline
        "sup_r": _u(rng, 5, 13) * s,
        "inf_r": _u(rng, 4, 11) * s,
    }
    p["acetab_thick"] = _u(rng, 3, 13) * s + 2
    return b


def _lerp(z: float, zs, vs) -> float:
    zs = np.asarray(zs, float)
    o = np.argsort(zs)
    return float(np.interp(z, zs[o], np.asarray(vs, float)[o]))


def _star(X, Y, cx, cy, R, harm: np.ndarray | None = None, weight: float = 1.0):
    """Depth inside a star-shaped outline (mm, > 0 inside) and the polar angle about its centre."""
    dx, dy = X - cx, Y - cy
    rho = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    r = np.full_like(rho, R)
    if harm is not None and weight > 0:
        mod = np.zeros_like(rho)
        for k, a, ph in harm:
            mod += a * np.cos(k * th + ph)
        r = R * (1 + weight * mod)
    return r - rho, th


def _bone(lab, X, Y, cx, cy, R, cortex, kind: str, harm=None, weight: float = 1.0):
    """Paint a bone cross-section: cortex shell of ``cortex`` mm around marrow."""
    reach = R * (1 + (float(np.abs(harm[:, 1]).sum()) * weight if harm is not None else 0.0)) + 1.0
    sl = _box(X, Y, cx, cy, reach)
    d, _ = _star(X[sl], Y[sl], cx, cy, R, harm, weight)
    c, m = L.BONE[kind]
    sub = lab[sl]
    sub[d > 0] = c
    sub[d > min(cortex, 0.45 * R)] = m


def _box(X, Y, cx, cy, reach) -> tuple[slice, slice]:
    """Rows/columns of the pixel grid within ``reach`` of (cx, cy): shapes are evaluated only there."""
    xs, ys = X[0], Y[:, 0]
    j0, j1 = np.searchsorted(xs, [cx - reach, cx + reach])
    i0, i1 = np.searchsorted(ys, [cy - reach, cy + reach])
    return slice(int(i0), int(i1)), slice(int(j0), int(j1))


def _tube(lab, X, Y, z: float, ctrl, radii, cortex: float, kind: str = "pelvis", n: int = 8) -> None:
    """Paint the axial section at ``z`` of a tube along the quadratic Bézier through the three 3D control
    points ``ctrl`` (mm), its radius going linearly from radii[0] to radii[1]: a round cross-section where
    the tube runs up and down, an elongated one where it runs across (a pubic ramus)."""
    c0, c1, c2 = (np.asarray(c, float) for c in ctrl)
    t = np.linspace(0, 1, n + 1)[:, None]
    pts = (1 - t) ** 2 * c0 + 2 * (1 - t) * t * c1 + t**2 * c2
    rad = radii[0] + (radii[1] - radii[0]) * t[:, 0]
    rmax = float(max(radii))
    if not (pts[:, 2].min() - rmax <= z <= pts[:, 2].max() + rmax):
        return
    near = np.abs(pts[:, 2] - z) <= rmax + np.abs(np.diff(pts[:, 2], prepend=pts[0, 2])) + 1
    sel = pts[near]
    sl = _box(X, Y, float(sel[:, 0].mean()), float(sel[:, 1].mean()),
              float(np.ptp(sel[:, 0]) + np.ptp(sel[:, 1])) / 2 + rmax + 2)
    px, py = X[sl], Y[sl]
    if px.size == 0:
        return
    d = np.full(px.shape, np.inf)
    for a, b_, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        ab = b_ - a
        if min(a[2], b_[2]) - max(ra, rb) > z or max(a[2], b_[2]) + max(ra, rb) < z:
            continue
        w = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
        w = np.clip(w, 0.0, 1.0)
        dist = np.sqrt((px - a[0] - w * ab[0]) ** 2 + (py - a[1] - w * ab[1]) ** 2 + (z - a[2] - w * ab[2]) ** 2)
        d = np.minimum(d, dist - (ra + w * (rb - ra)))
    c, m = L.BONE[kind]
    sub = lab[sl]
    sub[d < 0] = c
    sub[d < -cortex] = m


def _arc(lab, X, Y, cx, cy, R, thick, cortex, sg, a0, a1, kind="pelvis"):
    """A curved bony plate: a ring of width ``thick`` between polar angles a0..a1 (mirrored for sg < 0)."""
    dx, dy = (X - cx) * sg, Y - cy
    rho, th = np.hypot(dx, dy), np.arctan2(dy, dx)
    ok = (th >= a0) & (th <= a1)
    dist = np.abs(rho - R)
    c, m = L.BONE[kind]
    lab[ok & (dist < thick / 2)] = c
    lab[ok & (dist < thick / 2 - cortex)] = m


def slice_labels(b: Body, z: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Generation labels of the axial slice at height ``z`` on the pixel centres X, Y (mm)."""
    p, s = b.p, b.s
    lab = np.zeros(X.shape, np.uint8)
    w_a, w_l, w_p = p["wiggle"]
    ox = w_a * np.sin(2 * np.pi * z / w_l + w_p)
    X = X - ox
    half = float(np.abs(X).max())
    # objects outside the body (painted first; the body overwrites them)
    for val, fx, fy, hw, hh, full_z in p["objects"]:
        if not full_z and not (b.z_hip - 200 * s < z < b.z_hip + 100 * s):
            continue
        if hw >= 2.0:  # table slab
            lab[(p["table_y"] < Y) & (p["table_y"] + hh * 2 * half > Y)] = val
        else:
            lab[(np.abs(X - fx * half) < hw * half) & (np.abs(Y - fy * half) < hh * half)] = val

    # --- soft tissue: union of body and limb outlines by max of depths
    depth = np.full(X.shape, -1e9)
    centres = []  # limb centres (for muscle sectors)
    m = b.muscularity
    if b.body_end <= z <= 30 * s:
        rx = b.dh + 62 * s * m
        d, _ = _star(X / (rx / b.body_ry), Y, 0.0, 12 * s, b.body_ry, p["h_body"])
        depth = np.maximum(depth, d)
    fx_off, fy_off = p["limb_off"]
    for sg in b.legs:
        if not (b.z_bot <= z <= b.z_hip + 10 * s):
            continue
        cx = sg * _lerp(z, [b.z_hip, b.z_knee, b.z_ankle], [b.dh + 20 * s, b.dk, b.da]) + sg * fx_off * (z > b.z_knee)
        cy = fy_off * (z > b.z_knee) + _lerp(z, [b.z_knee, b.z_knee - 80 * s, b.z_ankle], [5 * s, 18 * s, 10 * s])
        R = _lerp(z, [b.z_hip, b.z_knee + 70 * s, b.z_knee, b.z_knee - 0.3 * (b.z_knee - b.z_ankle), b.z_ankle,
                      b.z_bot],
                  [80 * s * m, 52 * s * m, 47 * s, 54 * s * m, 27 * s, 28 * s])
        sl = _box(X, Y, cx, cy, R * (1 + float(p["h_limb"][:, 1].sum())) + 1)
        d, _ = _star(X[sl], Y[sl], cx, cy, R, p["h_limb"])
        depth[sl] = np.maximum(depth[sl], d)
        centres.append((cx, cy, R))
    if b.body_end <= z:
        centres += [(sg * b.dh, 10 * s, 90 * s) for sg in (1, -1)]
    lab[depth > 0] = L.SKIN
    lab[depth > b.skin] = L.FAT
    muscle = depth > b.fat + b.skin
    if muscle.any() and centres:
        # muscle groups: angular sectors about the nearest limb centre, separated by thin septa
        Xm, Ym = X[muscle], Y[muscle]
        cxs = np.array([c[0] for c in centres])
        near = np.argmin(np.abs(Xm[:, None] - cxs), axis=-1)
        ccx, ccy = cxs[near], np.array([c[1] for c in centres])[near]
        th = np.mod(np.arctan2(Ym - ccy, (Xm - ccx) * np.where(ccx < 0, -1.0, 1.0)), 2 * np.pi)
        rho = np.hypot(Xm - ccx, Ym - ccy)
        sect = np.searchsorted(p["sectors"], th) % 4
        vals = np.asarray(p["sector_labels"], np.uint8)[sect]
        ang = np.full(th.shape, np.inf)
        for bnd in p["sectors"]:
            ang = np.minimum(ang, np.abs(np.mod(th - bnd + np.pi, 2 * np.pi) - np.pi))
        vals[(ang * rho < p["septum"] / 2) & (rho > 15 * s)] = L.SEPTUM
        lab[muscle] = vals
        for cx, cy, R in centres[: len(b.legs)] if b.z_ankle <= z <= b.z_hip else []:
            for a, f, rv in p["vessels"]:
                vx, vy = cx + np.cos(a) * f * R * np.sign(cx or 1.0), cy + np.sin(a) * f * R
                lab[muscle & (np.hypot(X - vx, Y - vy) < rv)] = L.VESSEL
        if b.z_hip - 40 * s <= z <= -10 * s:
            sl = _box(X, Y, 0, 8 * s, 42 * s * (1 + float(p["h_body"][:, 1].sum())) + 1)
            d, _ = _star(X[sl], Y[sl], 0, 8 * s, 42 * s, p["h_body"])
            lab[sl][muscle[sl] & (d > 0)] = L.VISCERA

    # --- pelvis
    cp = p["cort_p"]
    if b.z_hip + 10 * s <= z <= -5 * s:  # sacrum: bone the node does not segment (see generate)
        R = _lerp(z, [b.z_hip + 10 * s, -5 * s], [16 * s, 38 * s])
        _bone(lab, X / 1.6, Y, 0, b.body_ry * 0.55, R / 1.3, cp, "pelvis" if p.get("sacrum_is_pelvis") else "other")
    for sg in (1, -1):
        if b.z_hip + 0.5 * b.rh <= z <= 0:  # iliac wing
            Rw = _lerp(z, [b.z_hip + 0.5 * b.rh, 0], [0.55 * b.dh, 0.78 * b.dh])
            th_w = _lerp(z, [b.z_hip + 0.5 * b.rh, 0], [16 * s, 7 * s])
            _arc(lab, X, Y, sg * 0.5 * b.dh, 5 * s, Rw, th_w, cp, sg, -0.9, 1.9)
        ra_in = b.rh + b.gap_hip
        ra_out = ra_in + p["acetab_thick"]
        dz = z - b.z_hip
        if -0.55 * b.rh <= dz <= ra_out:  # acetabulum: a cup open laterally and below
            cx = sg * b.dh
            dx, dy = (X - cx) * sg, Y
            rho = np.hypot(dx, dy)
            r_in = np.sqrt(max(ra_in**2 - dz**2, 0.0))
            r_out = np.sqrt(max(ra_out**2 - dz**2, 0.0))
            medial = dx < 0.45 * rho
            c, mm = L.BONE["pelvis"]
            shell = (rho < r_out) & (rho >= r_in) & (medial | (dz > 0.3 * b.rh))
            lab[shell] = c
            lab[shell & (rho > r_in + cp) & (rho < r_out - cp)] = mm
            lab[(rho < r_in) & (np.hypot(rho, dz) > b.rh)] = L.FLUID
        zc, hz = b.z_hip - 38 * s, 32 * s
        if p["pelvis_ring"] and abs(z - zc) < hz:  # ischiopubic ring around the obturator foramen
            R = 24 * s * np.sqrt(1 - ((z - zc) / hz) ** 2) + 2
            _arc(lab, X, Y, sg * (b.dh - 38 * s), -4 * s, R, 9 * s, cp, 1, -np.pi, np.pi)
        tb = p["pelvis_tubes"]
        if tb:  # ischium and pubic rami as solid tubes (each skips the slices it does not reach)
            def at(m: float, y: float, dz_: float) -> np.ndarray:  # used in this iteration only
                return np.array([sg * (b.dh - m), y, b.z_hip + dz_])  # noqa: B023
            top, bot = at(*tb["isch_top"]), at(*tb["isch_bot"])
            sym = np.array([sg * tb["sym"][0], tb["sym"][1], b.z_hip + tb["sym"][2]])  # beside the midline
            sup0, inf1 = at(12 * s, -14 * s, -0.2 * b.rh), bot + [0, -6 * s, 12 * s]
            _tube(lab, X, Y, z, (top, (top + bot) / 2 + [0, 5 * s, 0], bot), tb["isch_r"], cp)
            _tube(lab, X, Y, z, (sup0, (sup0 + sym) / 2 + [0, -6 * s, 0], sym), (tb["sup_r"], tb["sup_r"] * 0.9), cp)
            low = (sym + inf1) / 2
            low[2] = min(sym[2], inf1[2]) - 5 * s  # the inferior ramus sags below both ends
            _tube(lab, X, Y, z, (sym, low, inf1), (tb["inf_r"], tb["inf_r"] * 1.1), cp)
    if p["pelvis_ring"] and b.z_hip - 60 * s <= z <= b.z_hip - 22 * s:  # pubic symphysis bar
        bar = (np.abs(X) < b.dh - 55 * s) & (np.abs(Y + 24 * s) < 6 * s)
        lab[bar] = L.PELVIS_CORTEX
        lab[bar & (np.abs(Y + 24 * s) < 6 * s - cp)] = L.PELVIS_MARROW

    # --- legs
    for sg in b.legs:
        _leg(lab, b, z, X, Y, sg)
    return lab


def _leg(lab, b: Body, z: float, X, Y, sg: int) -> None:
    p, s, rh = b.p, b.s, b.rh
    zh, zk, za = b.z_hip, b.z_knee, b.z_ankle
    # femur: head, neck, trochanter, shaft, condyles
    if abs(z - zh) < rh:
        r = np.sqrt(rh**2 - (z - zh) ** 2)
        _bone(lab, X, Y, sg * b.dh, 0.0, r, 2.0, "femur")
    zt = zh - 38 * s
    if zt - 10 * s <= z <= zh:  # neck: a tilted cylinder cut axially, an ellipse moving laterally
        f = (zh - z) / (zh - zt + 1e-6)
        cx = sg * (b.dh + f * 38 * s)
        _bone(lab, X / 1.5, Y, cx / 1.5, 2 * s, 0.62 * rh / 1.2, 2.0, "femur")
    if zh - 55 * s <= z <= zh + 5 * s:  # greater trochanter
        _bone(lab, X, Y, sg * (b.dh + 42 * s), 6 * s, 17 * s, 2.0, "femur", p["h_fem"])
    z_end = zk + b.gap_knee / 2
    if z_end <= z <= zh - 30 * s:
        zs = [zh - 30 * s, zh - 90 * s, zk + 90 * s, zk + 45 * s, z_end]
        cx = sg * _lerp(z, zs, [b.dh + 36 * s, b.dh + 22 * s, b.dk + 4 * s, b.dk, b.dk])
        cy = _lerp(z, zs, [4 * s, -3 * s, 0, 3 * s, 6 * s])
        R = _lerp(z, zs, [17 * s, 14 * s * p["fr"], 15 * s * p["fr"], 31 * s, 37 * s])
        w = _lerp(z, zs, [0.3, 1, 1, 0.2, 0.1])
        cort = _lerp(z, zs, [2.5, p["cort_f"] * R, p["cort_f"] * R, 2.0, 1.5])
        harm = p["h_fem"].copy()
        harm[:, 1] *= w
        harm[0] = (2, harm[0, 1] + (1 - w) * 0.18, 0.0) if w < 1 else harm[0]  # condyles wider across
        _bone(lab, X, Y, cx, cy, R, cort, "femur", harm)
        if z < zk + 25 * s:  # intercondylar notch (fat), opening posteriorly
            lab[np.hypot(X - cx, Y - cy - 0.85 * R) < 0.32 * R] = L.FAT
        if zk + 10 * s <= z <= zk + 52 * s:  # patella: bone that is not segmented
            t = (z - zk - 31 * s) / (21 * s)
            rp = 20 * s * np.sqrt(max(1 - t * t, 0.05))
            _bone(lab, X, Y / 0.45, cx, (cy - R - 11 * s) / 0.45, rp, 1.5, "other")
    if abs(z - zk) <= b.gap_knee / 2:
        lab[np.hypot(X - sg * b.dk, Y - 3 * s) < 34 * s] = L.FLUID
    # tibia: plateau, triangular shaft, distal flare
    zt0 = zk - b.gap_knee / 2
    zs = [zt0, zk - 30 * s, zk - 80 * s, za + 60 * s, za + 4 * s]
    if za + 4 * s <= z <= zt0:
        tr = p["tr"]
        Rs = [35 * s, 27 * s, 13 * s * tr, 14 * s * tr, 20 * s]
        cx_t = sg * _lerp(z, zs, [b.dk, b.dk, 0.6 * b.dk + 0.4 * b.da, b.da, b.da])
        cy_t = _lerp(z, zs, [3 * s, 0, -3 * s, -2 * s, 2 * s])
        R = _lerp(z, zs, Rs)
        w = _lerp(z, zs, [0.1, 0.5, 1, 1, 0.4])
        harm = p["h_tibia"].copy()
        harm[:, 1] *= w
        if w < 0.6:
            harm[0] = (2, 0.22 * (1 - w), 0.0)  # plateau: wide across
        if sg < 0:  # mirror the shape for the right leg
            harm[:, 2] = np.pi * harm[:, 0] - harm[:, 2]
        cort = _lerp(z, zs, [1.5, 2.5, p["cort_t"] * R, p["cort_t"] * R, 1.5])
        _bone(lab, X, Y, cx_t, cy_t, R, cort, "tibia", harm)
    # fibula: head under the lateral plateau, lateral malleolus below the tibia
    zf = [zk - 12 * s, zk - 35 * s, zk - 80 * s, za + 40 * s, za - 22 * s]
    if zf[-1] <= z <= zf[0]:
        tr = p["tr"]
        Rt = _lerp(z, zs + [za - 30 * s], [35 * s, 27 * s, 13 * s * tr, 14 * s * tr, 20 * s, 18 * s])
        Rf_shaft = 13 * s * tr * p["fib_ratio"]
        Rf = _lerp(z, zf, [10 * s, 8 * s, Rf_shaft, Rf_shaft, 9 * s])
        a = _lerp(z, [zf[0], zf[-1]], list(p["fib_angle"]))
        dist = 0.8 * Rt + Rf + p["fib_gap"]
        cx_t = sg * _lerp(z, zs + [za - 30 * s], [b.dk, b.dk, 0.6 * b.dk + 0.4 * b.da, b.da, b.da, b.da])
        cy_t = _lerp(z, zs, [3 * s, 0, -3 * s, -2 * s, 2 * s])
        cort = min(p["cort_fi"] * Rf, 2.5)
        _bone(lab, X, Y, cx_t + sg * np.cos(a) * dist, cy_t + np.sin(a) * dist, Rf, cort, "fibula", p["h_fib"])
    if b.z_bot <= z <= za - 3 * s:  # talus: not segmented
        _bone(lab, X, Y, sg * b.da, 4 * s, 20 * s, 1.5, "other")


def _z_range(b: Body, region: str, rng: np.random.Generator) -> tuple[float, float]:
    s = b.s
    top, bot = 30 * s, b.z_bot
    if region == "pelvis":
        return top, b.z_hip - 110 * s
    if region == "thigh":
        return b.z_hip + _u(rng, -40, 20) * s, b.z_knee + _u(rng, -20, 60) * s
    if region == "knee":
        return b.z_knee + _u(rng, 60, 160) * s, b.z_knee - _u(rng, 60, 160) * s
    if region == "calf":
        return b.z_knee + _u(rng, -10, 40) * s, bot
    return top, bot


def generate(seed: int, size: int = 256, dz: float = 3.0, region: str | None = None,
             sacrum_is_pelvis: bool = False) -> tuple[np.ndarray, dict]:
    """One random label map (nz, size, size) uint8 in generation labels, superior slice first, and its
    metadata (pixel size, slice spacing, region, seed). ``region`` None: "full" half the time, else a
    random partial field of view.

    ``sacrum_is_pelvis``: label the sacrum as pelvis, as v0.2.0 was trained. The node's PELVIS is the two hip
    bones (the shape model's and the acceptance phantoms' definition); a generator that called the sacrum pelvis
    beside real shapes that call it background taught the network both, and it labels the sacrum pelvis.
    The choice draws nothing from ``rng``, so every other part of a seed's map is the same either way."""
    rng = np.random.default_rng(seed)
    b = random_body(rng)
    b.p["sacrum_is_pelvis"] = sacrum_is_pelvis
    if region is None:
        region = "full" if rng.random() < 0.5 else str(rng.choice(REGIONS[1:]))
    ztop, zbot = _z_range(b, region, rng)
    width = 2 * (b.dh + 80 * b.s * b.muscularity + b.fat + 10) * _u(rng, 1.05, 1.3)
    ps = width / size
    c = (np.arange(size) - (size - 1) / 2) * ps
    X, Y = np.meshgrid(c, c + 12 * b.s)
    zs = np.arange(ztop, zbot, -dz)
    vol = np.stack([slice_labels(b, float(z), X, Y) for z in zs])
    return vol, {"seed": seed, "pixel_mm": ps, "slice_mm": dz, "region": region, "scale": b.s, "legs": list(b.legs)}

