"""Left and right from patient coordinates: pieces land on the side of the midline they lie on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dicom_node.segments import split_sides
from inference.labels import DEFAULT_LABELS
from inference.phantom import Anatomy, Geometry, render


def phantom(legs: str, region_top: float, row_dir=(1, 0, 0), col_dir=(0, 1, 0), shift=(25.0, 0.0, 0.0)):
    anat = replace(Anatomy(scale=0.8, legs=legs, shift=shift), noise=0.0)
    ps, n = 2.0, 180
    rd, cd = np.asarray(row_dir, float), np.asarray(col_dir, float)
    origin = -(n - 1) / 2 * ps * (rd + cd) + np.array([shift[0], 15, region_top])
    g = Geometry(n, n, 12, (ps, ps), tuple(origin), row_dir, col_dir, (0, 0, -10.0), 10.0)
    ph = render(anat, g)
    origins = np.array([g.slice_origin(k) for k in range(g.n_slices)])
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
