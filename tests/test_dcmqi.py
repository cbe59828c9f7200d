"""Another reader of the SEG: dcmqi's segimage2itkimage (the converter 3D Slicer uses) reads the node's BINARY
SEG back to the same label volume on the source grid, voxel for voxel, with an odd matrix (bit packing
across frames) and the frames the SEG omits (empty ones) given back as background."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_series


def _segimage2itkimage() -> str:
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    if not Path(exe).exists():
        pytest.fail(
            "segimage2itkimage missing: install the test extras (pip install -e '.[test]', ./node.sh test does)"
        )
    return exe


def test_dcmqi_reads_the_seg_back_voxel_exact(tmp_path):
    import SimpleITK as sitk

    from dicom_node.encode.seg_writer import build_seg
    from dicom_node.infer.segments import split_sides
    from inference.model_card import ModelCard

    ph, paths = write_series(tmp_path / "src", seed=83, n_slices=24, size=125)  # 125x125: frames share bytes
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in src])
    labels = ph.labels[[int(round((ph.geometry.origin[2] - o[2]) / ph.geometry.slice_thickness)) for o in origins]]
    card = ModelCard(version="dcmqi")
    seg_labels, segments = split_sides(labels, card.labels, origins, (1, 0, 0), (0, 1, 0), ph.geometry.pixel_spacing)
    seg_labels[:2] = 0  # two slices without any structure: frames the SEG omits
    assert len(segments) >= 4
    seg = build_seg(src, seg_labels, segments, card, series_description="t", series_number=9, manufacturer="t")
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)

    out = tmp_path / "dcmqi"
    out.mkdir()
    r = subprocess.run([_segimage2itkimage(), "--inputDICOM", str(tmp_path / "seg.dcm"), "--outputDirectory", str(out),
                        "-t", "nrrd", "-p", "seg"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    meta = json.loads((out / "seg-meta.json").read_text())

    # the source grid as ITK sees it (slices sorted along the normal) and our label map in that order
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    ref = reader.Execute()
    normal = np.cross(*np.array(src[0].ImageOrientationPatient, float).reshape(2, 3))
    order = np.argsort(origins @ normal)
    reader.SetFileNames([str(paths[i]) for i in order])
    ref = reader.Execute()
    expected = seg_labels[order]

    got = np.zeros_like(expected)
    files = sorted(out.glob("seg-*.nrrd"))
    assert files, sorted(p.name for p in out.iterdir())
    for f in files:
        img = sitk.ReadImage(str(f))
        on_grid = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        for attrs in meta["segmentAttributes"][int(f.stem.split("-")[1]) - 1]:
            number = attrs["labelID"]
            assert not (got[on_grid == number] != 0).any(), "segments overlap after reading"
            got[on_grid == number] = number
    assert {a["labelID"] for group in meta["segmentAttributes"] for a in group} == {s.number for s in segments}
    np.testing.assert_array_equal(got, expected)
