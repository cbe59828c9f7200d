"""The quality gate's checks (dicom_node/gate/quality.py) on hand-made label maps with known anatomy.

Each check is shown to fire on the one defect it is for, and to stay quiet on a plausible leg, including
the same leg stored in the opposite slice order (feet-first or reversed stacking).
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.gate.quality import QualityReport, StructureQuality, assess, worst
from dicom_node.infer.segments import split_sides
from dicom_node.infer.volume import SeriesVolume
from inference.labels import DEFAULT_LABELS

FEMUR, TIBIA, FIBULA, PELVIS = 1, 2, 3, 4
N, SIZE, STEP = 40, 100, 5.0  # slices, pixels (1 mm), slice spacing (mm)


def disc(labels, k0, k1, value, r, cy=50, cx=50):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels[k0:k1][:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def leg(pelvis: bool = False) -> np.ndarray:
    """Slice 0 is the most superior (head-first stacking): pelvis, femur, then tibia beside a fibula."""
    lab = np.zeros((N, SIZE, SIZE), np.uint8)
    if pelvis:  # beside the femur's head and reaching 3.5 cm (1.75 head diameters) below its top
        disc(lab, 0, 14, PELVIS, 12, cx=20)
        disc(lab, 6, 18, FEMUR, 10)
    else:
        disc(lab, 0, 18, FEMUR, 10)
    disc(lab, 20, 40, TIBIA, 9, cx=45)
    disc(lab, 22, 40, FIBULA, 3, cx=66)
    return lab


def volume(reverse: bool = False) -> SeriesVolume:
    z = -STEP * np.arange(N)
    origins = np.stack([np.zeros(N), np.zeros(N), z], 1)
    if reverse:
        origins = origins[::-1].copy()
    return SeriesVolume(np.zeros((N, SIZE, SIZE), np.float32), [], (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0),
                        STEP, origins)


def judge(labels, vol=None, probs=None, tta=None, **kw) -> QualityReport:
    vol = vol or volume()
    seg, segments = split_sides(labels, list(DEFAULT_LABELS), vol.origins, vol.row_dir, vol.col_dir,
                                vol.pixel_spacing, declared="R")
    return assess(vol, seg, segments, DEFAULT_LABELS, probs, tta, declared="R", **kw)


def by(report: QualityReport) -> dict[str, StructureQuality]:
    return {q.structure: q for q in report.structures}


def sure(labels, p: float = 0.97) -> np.ndarray:
    """Probabilities that agree with ``labels`` at level ``p``."""
    probs = np.full((5,) + labels.shape, int(255 * (1 - p) / 4), np.uint8)
    for v in range(5):
        probs[v][labels == v] = int(255 * p)
    return probs


def test_a_plausible_leg_passes_in_either_slice_order():
    lab = leg(pelvis=True)
    rep = judge(lab, probs=sure(lab), tta=lab.copy())
    assert rep.verdict == "pass", rep.summary()
    assert set(by(rep)) == {"FEMUR RIGHT", "TIBIA RIGHT", "FIBULA RIGHT", "PELVIS"}
    # the same anatomy stacked feet-first (slice 0 most inferior): patient z decides, not the index
    rev = lab[::-1].copy()
    assert judge(rev, vol=volume(reverse=True)).verdict == "pass"
    f = by(rep)["FEMUR RIGHT"].metrics
    assert f["pieces"] == 1 and f["length_cm"] == pytest.approx(6.0) and f["tta_dice"] == 1.0
    assert f["area_cm2"] == pytest.approx(np.pi, rel=0.05) and f["confidence"] > 0.95


def test_tibia_without_fibula_fails():
    lab = leg()
    lab[lab == FIBULA] = 0
    q = by(judge(lab))["TIBIA RIGHT"]
    assert q.verdict == "fail" and "no fibula beside it" in q.reason


def test_fibula_without_tibia_fails():
    lab = leg()
    lab[lab == TIBIA] = 0
    q = by(judge(lab))["FIBULA RIGHT"]
    assert q.verdict == "fail" and "no tibia beside it" in q.reason


def test_a_short_tibia_alone_near_the_knee_is_normal():
    lab = leg()
    lab[lab == FIBULA] = 0
    lab[25:] = np.where(lab[25:] == TIBIA, 0, lab[25:])  # 5 slices (2.5 cm) of tibial plateau only
    assert by(judge(lab))["TIBIA RIGHT"].verdict == "pass"


def test_fibula_larger_than_tibia_fails_on_both():
    lab = leg()
    lab[lab >= TIBIA] = 0
    disc(lab, 20, 40, TIBIA, 3, cx=66)
    disc(lab, 22, 40, FIBULA, 9, cx=45)
    q = by(judge(lab))
    for name in ("TIBIA RIGHT", "FIBULA RIGHT"):
        assert q[name].verdict == "fail" and "fibula as large as the tibia" in q[name].reason
        assert q[name].metrics["fibula_larger_share"] == 1.0


def test_femur_below_tibia_fails():
    lab = np.zeros((N, SIZE, SIZE), np.uint8)
    disc(lab, 0, 18, TIBIA, 9, cx=45)
    disc(lab, 0, 18, FIBULA, 3, cx=66)
    disc(lab, 20, 40, FEMUR, 10)
    q = by(judge(lab))
    assert q["FEMUR RIGHT"].verdict == "fail" and "femur not above the tibia" in q["FEMUR RIGHT"].reason
    # and upside down in index order but right way up in patient coordinates: fine
    assert judge(lab, vol=volume(reverse=True)).verdict == "pass"


def test_pelvis_below_femur_fails():
    lab = np.zeros((N, SIZE, SIZE), np.uint8)
    disc(lab, 0, 18, FEMUR, 10)
    disc(lab, 20, 30, PELVIS, 30)
    q = by(judge(lab))
    assert q["PELVIS"].verdict == "fail" and "pelvis not above the femur" in q["PELVIS"].reason


def test_a_pelvis_that_stops_at_the_top_of_the_femur_fails():
    """Both passes of a model that misses the ischium and pubis agree; only the anatomy tells."""
    lab = leg(pelvis=True)
    assert judge(lab, tta=lab.copy()).verdict == "pass"
    assert by(judge(lab))["PELVIS"].metrics["pelvis_reach_heads"] == pytest.approx(1.75, abs=0.02)
    lab[7:14][lab[7:14] == PELVIS] = 0  # ends one slice below the femur's top: 0.25 head diameters
    q = by(judge(lab, tta=lab.copy()))["PELVIS"]
    assert q.verdict == "fail" and "lower pelvis looks missing" in q.reason
    lab = leg(pelvis=True)
    lab[12:14][lab[12:14] == PELVIS] = 0  # 1.25 diameters: a warning
    assert by(judge(lab))["PELVIS"].verdict == "warn"
    lab = leg(pelvis=True)
    lab[7:14][lab[7:14] == PELVIS] = 0
    lab[11:] = 0  # the scan stops 2.5 cm below the femur's top: too soon to judge
    vol = volume()
    vol = SeriesVolume(vol.array[:11], [], vol.row_dir, vol.col_dir, vol.pixel_spacing, STEP, vol.origins[:11])
    assert "pelvis_reach_heads" not in by(judge(lab[:11], vol=vol))["PELVIS"].metrics


def test_a_bone_in_two_pieces_fails():
    lab = leg()
    lab[8:10][lab[8:10] == FEMUR] = 0
    q = by(judge(lab))["FEMUR RIGHT"]
    assert q.verdict == "fail" and "2 separate pieces" in q.reason and q.metrics["pieces"] == 2


def test_the_pelvis_may_show_three_pieces():
    lab = np.zeros((N, SIZE, SIZE), np.uint8)
    disc(lab, 0, 14, PELVIS, 12, cx=20)
    disc(lab, 0, 14, PELVIS, 12, cx=80)
    disc(lab, 0, 8, PELVIS, 8, cy=80)
    disc(lab, 6, 40, FEMUR, 10)
    assert by(judge(lab))["PELVIS"].verdict == "pass"


def test_a_bone_whose_neighbour_must_show_fails_without_it():
    """A "pelvis" in a scan reaching 16 cm below it with no femur: the model found it in the wrong place."""
    lab = np.zeros((N, SIZE, SIZE), np.uint8)
    disc(lab, 4, 8, PELVIS, 30)
    q = by(judge(lab))["PELVIS"]
    assert q.verdict == "fail" and "no femur below it" in q.reason
    lab = leg()
    lab[lab >= TIBIA] = 0  # femur, then 11 cm of scan below it with no tibia
    q = by(judge(lab))["FEMUR RIGHT"]
    assert q.verdict == "fail" and "no tibia below it" in q.reason
    lab = leg()
    lab[lab == FEMUR] = 0  # tibia and fibula, with 10 cm of scan above them and no femur
    q = by(judge(lab))["TIBIA RIGHT"]
    assert q.verdict == "fail" and "no femur above it" in q.reason
    lab = leg()
    lab[:16] = 0  # the scan ends 1 cm above the knee: nothing to expect above the femur's end
    assert judge(lab).verdict == "pass"


def test_cross_section_out_of_bounds_fails():
    lab = leg()
    lab[lab == FEMUR] = 0
    disc(lab, 0, 18, FEMUR, 45)  # 64 cm² mean cross-section: no femur is that thick
    q = by(judge(lab))["FEMUR RIGHT"]
    assert q.verdict == "fail" and "mean cross-section" in q.reason
    lab = leg()
    lab[lab == FEMUR] = 0
    disc(lab, 0, 18, FEMUR, 3)  # 0.28 cm²: thinner than a small child's femur
    assert by(judge(lab))["FEMUR RIGHT"].verdict == "fail"


def test_low_model_confidence_fails_and_middling_warns():
    lab = leg()
    assert by(judge(lab, probs=sure(lab, 0.6)))["TIBIA RIGHT"].verdict == "fail"
    q = by(judge(lab, probs=sure(lab, 0.85)))["TIBIA RIGHT"]
    assert q.verdict == "warn" and "less sure" in q.reason


def test_disagreement_with_the_augmented_pass_fails():
    lab = leg()
    tta = lab.copy()
    tta[tta == TIBIA] = 0
    disc(tta, 20, 40, TIBIA, 9, cx=35)  # the augmented pass puts the tibia 10 mm away
    rep = judge(lab, tta=tta)
    q = by(rep)["TIBIA RIGHT"]
    assert q.verdict == "fail" and "unstable" in q.reason and q.metrics["tta_dice"] < 0.8
    assert by(rep)["FEMUR RIGHT"].verdict == "pass"


def test_with_the_mean_of_two_passes_the_passes_themselves_are_compared():
    """The result is the mean of the plain and the augmented pass, so it lies between them and agrees with
    each better than they agree with each other: given the plain pass, the gate compares the two passes."""
    lab = leg()
    plain = lab.copy()
    plain[plain == TIBIA] = 0
    disc(plain, 20, 40, TIBIA, 9, cx=35)  # the plain pass put the tibia 10 mm away; the result sided with the other
    assert by(judge(lab, tta=lab.copy()))["TIBIA RIGHT"].verdict == "pass"
    rep = judge(lab, tta=lab.copy(), first_labels=plain)
    q = by(rep)["TIBIA RIGHT"]
    assert q.verdict == "fail" and "unstable" in q.reason and q.metrics["tta_dice"] < 0.8
    assert by(rep)["FEMUR RIGHT"].verdict == "pass"


def test_a_structure_only_the_augmented_pass_finds_fails():
    lab = leg(pelvis=True)
    tta = lab.copy()
    lab[lab == PELVIS] = 0
    rep = judge(lab, tta=tta)
    q = by(rep)["PELVIS"]
    assert rep.verdict == "fail" and "missing from the result" in q.reason
    assert rep.short_names() == ["pelvis"]


def test_verdict_is_the_worst_and_summary_names_the_structures():
    assert worst(["pass", "warn", "pass"]) == "warn" and worst(["warn", "fail"]) == "fail" and worst([]) == "pass"
    lab = leg()
    lab[lab == FIBULA] = 0
    rep = judge(lab)
    assert rep.verdict == "fail"
    assert rep.summary().startswith("fail: tibia right: fail: no fibula")
    assert rep.short_names() == ["tibia R"]
