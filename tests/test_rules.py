"""Rules and the geometry check: which series are segmented, and the reason for each one that is not."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dicom_node.config import Rule
from dicom_node.decide.rules import decide, match_rules
from dicom_node.slices import split_blocks, stack


def series(modality="MR", body="", desc=""):
    return SimpleNamespace(modality=modality, body_part=body, series_description=desc)


def inst(z, ori=(1, 0, 0, 0, 1, 0), rows=64, image_type="ORIGINAL\\PRIMARY", frames=1, spacing="1\\1"):
    return SimpleNamespace(rows=rows, columns=64, frames=frames, image_type=image_type,
                           orientation="\\".join(map(str, ori)), position=f"0\\0\\{z}", pixel_spacing=spacing,
                           frame_of_reference_uid="1.2.3", path="")


@pytest.mark.parametrize("body,study,desc,ok", [
    ("LEG", "", "", True),
    ("", "MRI LOWER LIMBS", "", True),
    ("", "", "cor stir left knee", True),
    ("", "", "AX_T1_Thigh", True),
    ("LOWEREXTREMITY", "", "", True),
    ("HEAD", "MRI BRAIN", "AX T2", False),
    ("", "", "SHIPMENT", False),  # HIP only as a whole word
])
def test_lower_limb_terms(body, study, desc, ok):
    rule, why = match_rules(series(body=body, desc=desc), study, [Rule()])
    assert (rule is not None) == ok, why


def test_modality_reason():
    rule, why = match_rules(series("CT", "LEG"), "", [Rule()])
    assert rule is None and "modality CT" in why


def test_stack_orders_by_position_and_drops_localizers():
    items = [inst(z) for z in (9, 3, 6, 0)] + [inst(50, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")]
    ordered, why = stack(items)
    assert why == "" and [float(i.position.split("\\")[2]) for i in ordered] == [0, 3, 6, 9]


@pytest.mark.parametrize("items,reason", [
    ([inst(0), inst(3, ori=(0, 1, 0, 0, 0, -1))], "mixed orientations"),
    ([inst(z, ori=(0, 1, 0, 0, 0, -1)) for z in range(3)], "sagittal"),
    ([inst(0), inst(3), inst(6), inst(30)], "blocks of 3+1 slices; each needs at least 3"),
    ([inst(0), inst(3), inst(6), inst(10.5), inst(13.5)], "inconsistent slice spacing"),
    ([inst(z) for z in (0, 3, 6, 9, 5, 8)], "inconsistent slice spacing"),  # overlapping stations
    ([inst(0), inst(3, rows=32)], "rows/columns"),
    ([inst(0, frames=40), inst(3, frames=40)], "several multi-frame instances"),
])
def test_geometry_reasons(items, reason):
    ordered, why = stack(items)
    assert ordered is None and reason in why


def test_min_slices_reason():
    d = decide(series(body="LEG"), "", [inst(z) for z in range(5)], [Rule(min_slices=20)])
    assert not d.segment and "5 slices" in d.reason


def test_a_series_larger_than_the_worker_can_hold_is_skipped_in_words():
    """worker.max_megavoxels: 30 slices of 1024² are 31 million voxels, skipped under a bound of 30 before
    anything is loaded (the worker would hold ~26 bytes a voxel), segmented under 32."""
    big = [SimpleNamespace(**{**vars(inst(z)), "rows": 1024, "columns": 1024}) for z in np.arange(30) * 3.0]
    d = decide(series(body="LEG"), "", big, [Rule(min_slices=20)], max_megavoxels=30)
    assert not d.segment and "31 million voxels, more than worker.max_megavoxels (30)" in d.reason
    assert decide(series(body="LEG"), "", big, [Rule(min_slices=20)], max_megavoxels=32).segment


def test_urgent_rule_marks_job_urgent():
    d = decide(series(body="KNEE"), "", [inst(z) for z in np.arange(30) * 3.0], [Rule(min_slices=20, urgent=True)])
    assert d.segment and d.urgent and len(d.instances) == 30


def test_duplicate_position_keeps_the_instance_received_last():
    a, b, c = inst(0), inst(3), inst(3)
    b.received_at, c.received_at = 1, 2
    ordered, note = stack([a, c, b])
    assert ordered == [a, c] and "1 duplicate slice positions" in note


def test_one_series_with_a_gap_between_stations_is_cut_into_blocks():
    upper = [inst(z) for z in (200, 195, 190, 185, 180)]
    lower = [inst(z) for z in (100, 95, 90, 85)]
    ordered, note = stack(lower[::-1] + upper)
    assert ordered is not None, note
    assert "2 blocks of 4+5 slices with gaps of 80.0 mm" in note
    blocks = split_blocks(ordered)
    assert [[float(i.position.split("\\")[2]) for i in b] for b in blocks] == [
        [85, 90, 95, 100],
        [180, 185, 190, 195, 200],
    ]
    # a series without gaps stays one block
    assert (
        split_blocks(stack([inst(z) for z in range(0, 30, 3)])[0])
        and len(split_blocks(stack([inst(z) for z in range(0, 30, 3)])[0])) == 1
    )


@pytest.mark.parametrize("change,words", [
    ({"frame_of_reference_uid": ""}, "cannot place a segmentation without a frame of reference"),
    ({"pixel_spacing": ""}, "missing or malformed PixelSpacing (0028,0030)"),
    ({"pixel_spacing": "0\\0.8"}, "missing or malformed PixelSpacing (0028,0030)"),
    ({"orientation": ""}, "missing or malformed ImageOrientationPatient (0020,0037)"),
    ({"orientation": "0\\0\\0\\0\\0\\0"}, "not two perpendicular unit vectors"),
    ({"orientation": "1\\0\\0\\1\\0\\0"}, "not two perpendicular unit vectors"),
    ({"position": ""}, "missing or malformed ImagePositionPatient (0020,0032)"),
])
def test_absent_type1_geometry_is_skipped_in_words_before_inference(change, words):
    """What anonymisers and exports drop: the series is skipped at the decision, with the attribute named."""
    slices = [inst(z) for z in range(25)]
    for s in slices:
        for key, value in change.items():
            setattr(s, key, value)
    d = decide(series(body="LEG"), "", slices, [Rule()])
    assert not d.segment and words in d.reason, d.reason
