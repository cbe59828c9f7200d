"""Left and right from patient coordinates: pieces land on the side of the midline they lie on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dicom_node.infer.segments import split_sides
from inference.labels import DEFAULT_LABELS
from inference.phantom import Anatomy, Geometry, render


def phantom(legs: str, region_top: float, row_dir=(1, 0, 0), col_dir=(0, 1, 0), shift=(25.0, 0.0, 0.0)):
    anat = replace(Anatomy(scale=0.8, legs=legs, shift=shift), noise=0.0)
    ps, n = 2.0, 180
    rd, cd = np.asarray(row_dir, float), np.asarray(col_dir, float)
    origin = -(n - 1) / 2 * ps * (rd + cd) + np.array([shift[0], 15, region_top])
    g = Geometry(n, n, 12, (ps, ps), tuple(origin), row_dir, col_dir, (0, 0, -10.0), 10.0)
    ph = render(anat, g)
    origins = g.slice_origins()
    xs = np.stack([g.world_coords(k)[0] for k in range(g.n_slices)])
    return anat, ph, origins, g, xs


@pytest.mark.parametrize("row_dir,col_dir", [((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, -1, 0)), ((0, 1, 0), (1, 0, 0))])
def test_both_legs_split_by_side_in_any_orientation(row_dir, col_dir):
    anat, ph, origins, g, xs = phantom("both", Anatomy(scale=0.8).z_knee + 60, row_dir, col_dir)
    seg, segments = split_sides(ph.labels, list(DEFAULT_LABELS), origins, row_dir, col_dir, g.pixel_spacing)
    names = {s.name for s in segments}
    assert {"FEMUR LEFT", "FEMUR RIGHT", "TIBIA LEFT", "TIBIA RIGHT"} <= names
    for s in segments:
        x = xs[seg == s.number]
        if s.side == "L":
            assert x.min() > anat.shift[0]  # patient's left is +x (LPS), beyond the body's midline
        elif s.side == "R":
            assert x.max() < anat.shift[0]
    assert (seg > 0).sum() == (ph.labels > 0).sum()  # nothing lost, nothing added


def test_single_leg_without_pelvis_or_declared_side_gets_no_side():
    _, ph, origins, g, _ = phantom("left", Anatomy(scale=0.8).z_knee + 60)
    _, segments = split_sides(ph.labels, list(DEFAULT_LABELS), origins, (1, 0, 0), (0, 1, 0), g.pixel_spacing)
    assert segments and all(s.side == "" for s in segments)
    _, segments = split_sides(ph.labels, list(DEFAULT_LABELS), origins, (1, 0, 0), (0, 1, 0), g.pixel_spacing, "L")
    assert all(s.side == "L" for s in segments)


def test_pelvis_gives_the_midline_and_stays_one_segment():
    _, ph, origins, g, xs = phantom("left", Anatomy(scale=0.8).z_head + 40)
    seg, segments = split_sides(ph.labels, list(DEFAULT_LABELS), origins, (1, 0, 0), (0, 1, 0), g.pixel_spacing)
    assert [s.name for s in segments if s.label.name == "PELVIS"] == ["PELVIS"]
    assert {s.name for s in segments if s.label.name == "FEMUR"} == {"FEMUR LEFT"}


def test_result_check_refuses_a_seg_that_does_not_match_its_source(tmp_path):
    """The node's own last check: a SEG with another matrix or frame of reference is refused with the reason."""
    import pydicom
    from conftest import write_series

    from dicom_node.encode.seg_writer import build_seg
    from dicom_node.encode.validate import InvalidResult, check_seg
    from inference.model_card import ModelCard

    ph, paths = write_series(tmp_path / "s", seed=71, n_slices=4, size=64)
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in src])
    labels = ph.labels[[int(round((ph.geometry.origin[2] - o[2]) / ph.geometry.slice_thickness)) for o in origins]]
    seg_labels, segments = split_sides(
        labels, list(DEFAULT_LABELS), origins, (1, 0, 0), (0, 1, 0), ph.geometry.pixel_spacing
    )
    seg = build_seg(
        src, seg_labels, segments, ModelCard(version="t"), series_description="t", series_number=1, manufacturer="t"
    )
    good = tmp_path / "seg.dcm"
    seg.save_as(good)
    check_seg(str(good), src)  # matches: no exception
    other = [d.copy() for d in src]
    for d in other:
        d.FrameOfReferenceUID = "1.2.3.4"
        d.Rows = 65
    with pytest.raises(InvalidResult, match="different Frame of Reference; matrix 64x64 vs source 65x64"):
        check_seg(str(good), other)


def test_postprocess_fills_long_bones_but_not_the_pelvic_ring():
    from inference.postprocess import clean_labels

    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    ring = (r > 10) & (r < 14)
    lab = np.zeros((3, 64, 64), np.uint8)
    lab[0][ring] = 4  # pelvis: a ring around the cavity
    lab[1][ring] = 1  # femur: cortex around a marrow the model missed
    out = clean_labels(lab, {1: "FEMUR", 4: "PELVIS"}, min_voxels=1)
    assert (out[0] == 4).sum() == ring.sum()  # cavity not added to the pelvis
    assert (out[1] == 1).sum() == (r < 14).sum()  # marrow filled in the femur
