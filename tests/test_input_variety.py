"""What PACS and scanners really send: compressed syntaxes (compressed by dcmtk's own tools), a localizer
mixed into the series, a repeated slice position, a leg scanned in two stations, sagittal slices."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from conftest import NodeProcess, PacsSCP, storescu, write_series


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variety")
    pacs = PacsSCP(tmp / "pacs")
    # a second destination that wants LABELMAP SEGs; dcmtk 3.6.7 predates that SOP class (DICOM 2024), so its
    # storescp must be told to accept unknown SOP classes (-pm) — as an older PACS would have to be
    viewer = PacsSCP(tmp / "viewer", aet="VIEWER", flags=("-pm",))
    more = (f'[[destinations]]\nname = "viewer"\nae_title = "VIEWER"\nport = {viewer.port}\n'
            f'seg_type = "labelmap"\nsend_sr = false\n')
    node = NodeProcess(tmp, pacs, more=more)
    node.viewer = viewer
    yield node, pacs
    node.stop()
    pacs.stop()
    viewer.stop()


def seg_frames(pacs, series_uid: str) -> int:
    """How many source instances the SEG for this series references (slices without bone have no frame,
    but every segmented source instance is listed in ReferencedSeriesSequence)."""
    for p in pacs.files():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            return len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    return 0


@pytest.mark.parametrize("how", ["jpeg-lossless (dcmcjpeg)", "jpeg-ls (dcmcjpls)", "rle (dcmcrle)", "jpeg2000 (pydicom)"])
def test_compressed_series_are_segmented(pair, workdir, how):
    node, pacs = pair
    _, paths = write_series(workdir / "raw", seed=61)
    tool = {"jpeg-lossless (dcmcjpeg)": ["dcmcjpeg", "+e1"], "jpeg-ls (dcmcjpls)": ["dcmcjpls"],
            "rle (dcmcrle)": ["dcmcrle"]}.get(how)
    out = workdir / "c"
    out.mkdir()
    expected_ts = None
    for p in paths:
        if tool:
            subprocess.run([*tool, str(p), str(out / p.name)], check=True, capture_output=True)
        else:
            ds = pydicom.dcmread(p)
            ds.compress(JPEG2000Lossless)
            ds.save_as(out / p.name)
        expected_ts = pydicom.dcmread(out / p.name, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert expected_ts.is_compressed
    # storescu proposes only uncompressed syntaxes unless told which compressed one to offer
    flag = {"jpeg-lossless (dcmcjpeg)": "-xs", "jpeg-ls (dcmcjpls)": "-xt", "rle (dcmcrle)": "-xr",
            "jpeg2000 (pydicom)": "-xv"}[how]
    r = storescu(node.port, out, flags=(flag,))
    assert r.returncode == 0, r.stderr
    series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    job = node.wait_job(series_uid)
    assert job["state"] == "done", job["reason"]
    db = node.db()
    from sqlalchemy import select

    from storage.models import Instance, Series

    with db.session() as s:
        ts = set(s.scalars(select(Instance.transfer_syntax).join(Series).where(Series.series_uid == series_uid)))
    db.dispose()
    assert ts == {str(expected_ts)}  # stored as received, not transcoded
    assert seg_frames(pacs, series_uid) == len(paths)


def test_localizer_mixed_in_is_left_out(pair, workdir):
    node, pacs = pair
    _, paths = write_series(workdir / "l", seed=62)
    loc = pydicom.dcmread(paths[0])
    loc.SOPInstanceUID = loc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal scout
    loc.save_as(workdir / "l" / "scout.dcm")
    assert storescu(node.port, workdir / "l").returncode == 0
    series_uid = loc.SeriesInstanceUID
    job = node.wait_job(series_uid)
    assert job["state"] == "done" and job["instances"] == len(paths) + 1
    assert seg_frames(pacs, series_uid) == len(paths)


def test_repeated_slice_position_keeps_the_later_instance(pair, workdir):
    node, pacs = pair
    _, paths = write_series(workdir / "d", seed=63)
    again = pydicom.dcmread(paths[5])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    again.save_as(workdir / "d" / "again.dcm")
    assert storescu(node.port, workdir / "d").returncode == 0
    job = node.wait_job(again.SeriesInstanceUID)
    assert job["state"] == "done"
    assert seg_frames(pacs, again.SeriesInstanceUID) == len(paths)
    assert "duplicate slice positions: kept the instance received last" in node.cli("show", str(job["job"])).stdout


def test_two_stations_as_two_series_each_get_a_seg(pair, workdir):
    from inference.phantom import small_series, write_dicom_series

    node, pacs = pair
    study, frame = generate_uid(), generate_uid()
    upper = small_series(seed=64, n_slices=24, size=128, region="thigh-knee")
    lower = small_series(seed=64, n_slices=24, size=128, region="leg")
    a = write_dicom_series(upper, workdir / "a", study_uid=study, frame_of_reference_uid=frame, series_number=3)
    b = write_dicom_series(lower, workdir / "b", study_uid=study, frame_of_reference_uid=frame, series_number=4)
    assert storescu(node.port, workdir / "a", workdir / "b").returncode == 0
    for paths in (a, b):
        uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        assert node.wait_job(uid)["state"] == "done"
        assert seg_frames(pacs, uid) > 0


def test_sagittal_series_is_skipped_with_its_reason(pair, workdir):
    from dataclasses import replace

    from inference.phantom import Anatomy, Geometry, render, write_dicom_series

    node, _ = pair
    g = Geometry(128, 96, 24, (3.0, 3.0), (-60.0, -150.0, -200.0), row_dir=(0, 1, 0), col_dir=(0, 0, -1),
                 slice_step=(5.0, 0, 0), slice_thickness=5.0)
    paths = write_dicom_series(render(replace(Anatomy(), noise=0.0), g), workdir / "sag")
    assert storescu(node.port, workdir / "sag").returncode == 0
    job = node.wait_job(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert job["state"] == "skipped" and "sagittal slices: the model segments axial slices only" in job["reason"]
    assert np.isfinite(job["instances"])


def test_multiframe_enhanced_mr_is_segmented(pair, workdir):
    """A multi-frame MR (highdicom's Legacy Converted Enhanced MR of a phantom series, frames shuffled)."""
    import highdicom as hd

    node, pacs = pair
    _, paths = write_series(workdir / "single", seed=65, order="shuffled")
    singles = [pydicom.dcmread(p) for p in paths]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=singles, series_instance_uid=generate_uid(), series_number=7,
        sop_instance_uid=generate_uid(), instance_number=1)
    mf.BodyPartExamined = "LEG"
    (workdir / "mf").mkdir()
    mf.save_as(workdir / "mf" / "enhanced.dcm", enforce_file_format=True)
    assert int(mf.NumberOfFrames) == len(paths)
    # storescu proposes a fixed list of common SOP classes; -R proposes exactly those of the files
    r = storescu(node.port, workdir / "mf", flags=("-R",))
    assert r.returncode == 0, r.stderr
    job = node.wait_job(mf.SeriesInstanceUID)
    assert job["state"] == "done", job["reason"]
    seg = next(pydicom.dcmread(p) for p in pacs.files()
               if pydicom.dcmread(p, stop_before_pixels=True).get("ReferencedSeriesSequence")
               and pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID == mf.SeriesInstanceUID
               and pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
    refs = {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for f in seg.PerFrameFunctionalGroupsSequence}
    assert refs and refs <= set(range(1, len(paths) + 1))


def test_odd_matrix_binary_and_labelmap_segs_agree(pair, workdir):
    """250×250: BINARY frames share bytes (62500 bits is not a multiple of 8): the bit packing must be right,
    and the LABELMAP SEG sent to the second destination must say exactly the same."""
    import highdicom as hd

    node, pacs = pair
    _, paths = write_series(workdir / "odd", seed=66, size=250)
    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    assert storescu(node.port, workdir / "odd").returncode == 0
    assert node.wait_job(uid)["state"] == "done"

    def find(scp):
        for p in scp.files():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid:
                return p
        return None

    binary = hd.seg.segread(find(pacs))
    labelmap = hd.seg.segread(find(node.viewer))
    assert binary.SegmentationType == "BINARY" and labelmap.SegmentationType == "LABELMAP"
    assert (binary.Rows, binary.Columns) == (250, 250)
    v = subprocess.run(["dciodvfy", str(find(pacs))], capture_output=True, text=True)
    assert not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")], v.stderr
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    a = binary.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    b = labelmap.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    assert a.shape == (len(paths), 250, 250) and (a > 0).sum() > 1000
    assert np.array_equal(a, b)
