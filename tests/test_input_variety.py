"""What PACS and scanners really send: compressed syntaxes (compressed by dcmtk's own tools), a localizer
mixed into the series, a repeated slice position, a leg scanned in two stations, sagittal slices."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, write_series
from pydicom.uid import JPEG2000Lossless, generate_uid


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
    try:
        pacs.stop()  # checks every SEG/SR received with dciodvfy
    finally:
        viewer.stop()


def seg_frames(pacs, series_uid: str) -> int:
    """How many source instances the SEG for this series references (slices without bone have no frame,
    but every segmented source instance is listed in ReferencedSeriesSequence)."""
    for p in pacs.files():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            return len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    return 0


@pytest.mark.parametrize(
    "how", ["jpeg-lossless (dcmcjpeg)", "jpeg-ls (dcmcjpls)", "rle (dcmcrle)", "jpeg2000 (pydicom)"]
)
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
    from inference.phantom import small_series
    from inference.phantom_io import write_dicom_series

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

    from inference.phantom import Anatomy, Geometry, render
    from inference.phantom_io import write_dicom_series

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
    seg = next(
        pydicom.dcmread(p)
        for p in pacs.files()
        if pydicom.dcmread(p, stop_before_pixels=True).get("ReferencedSeriesSequence")
        and pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
        == mf.SeriesInstanceUID
        and pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
    )
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


def _enhanced_mr(singles: list, series_uid: str):
    """An Enhanced MR Image (PS3.3 A.36.2) laid out as scanners write one: plane position and orientation per
    frame, pixel measures shared, frame content with stack dimension indices, frames in acquisition order
    (here the shuffled order they were given in)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    first = singles[0]
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
               "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "BodyPartExamined"):
        if kw in first:
            setattr(ds, kw, getattr(first, kw))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 9
    ds.SeriesDescription = "AX T1 ENHANCED LOWER LIMB"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = first.StudyDate, "120000", first.StudyDate + "120000"
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = len(singles)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = first.PixelSpacing, first.SliceThickness
    shared.PixelMeasuresSequence = Sequence([pm])
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = 0, 1, "US"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ft = Dataset()
    ft.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared.MRImageFrameTypeSequence = Sequence([ft])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    dim_uid = generate_uid()
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    idx = []
    for pointer in (0x00209056, 0x00209057):  # Stack ID, In-Stack Position Number
        d = Dataset()
        d.DimensionOrganizationUID, d.DimensionIndexPointer, d.FunctionalGroupPointer = dim_uid, pointer, 0x00209111
        idx.append(d)
    ds.DimensionIndexSequence = Sequence(idx)
    normal = np.cross(
        np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    )
    depth = [float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)) for s in singles]
    rank = {k: r + 1 for r, k in enumerate(np.argsort(depth))}
    frames = []
    for k, s in enumerate(singles):
        f = Dataset()
        fc = Dataset()
        fc.StackID, fc.InStackPositionNumber, fc.DimensionIndexValues = "1", rank[k], [1, rank[k]]
        f.FrameContentSequence = Sequence([fc])
        pp, po = Dataset(), Dataset()
        pp.ImagePositionPatient = s.ImagePositionPatient
        po.ImageOrientationPatient = s.ImageOrientationPatient
        f.PlanePositionSequence, f.PlaneOrientationSequence = Sequence([pp]), Sequence([po])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([s.pixel_array.astype(np.uint16) for s in singles]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ds


def test_native_enhanced_mr_is_segmented_on_its_own_frame_geometry(pair, workdir):
    """Enhanced MR Image Storage (not the legacy-converted class): per-frame plane positions and orientations.
    The SEG references the instance's frames and each SEG frame sits where its source frame sits."""
    import highdicom as hd

    node, pacs = pair
    _, paths = write_series(workdir / "single", seed=66, order="shuffled")
    singles = [pydicom.dcmread(p) for p in paths]
    mr = _enhanced_mr(singles, generate_uid())
    (workdir / "emr").mkdir()
    mr.save_as(workdir / "emr" / "enhanced.dcm", enforce_file_format=True)
    r = storescu(node.port, workdir / "emr", flags=("-R",))
    assert r.returncode == 0, r.stderr
    job = node.wait_job(mr.SeriesInstanceUID)
    assert job["state"] == "done", job["reason"]
    seg_path = next(p for p in pacs.files() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
                    and pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
                    == mr.SeriesInstanceUID)
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID == mr.SOPClassUID
    n_checked = 0
    for f in seg.PerFrameFunctionalGroupsSequence:
        src = int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        want = mr.PerFrameFunctionalGroupsSequence[src - 1].PlanePositionSequence[0].ImagePositionPatient
        got = f.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in got], [float(v) for v in want], atol=1e-3)
        n_checked += 1
    assert n_checked > 0
    # the bone is where the phantom's bone is: labels per source frame against the phantom's own masks
    labels = hd.seg.segread(seg_path).get_pixels_by_source_frame(
        mr.SOPInstanceUID, list(range(1, len(singles) + 1)), combine_segments=True, skip_overlap_checks=True,
        ignore_spatial_locations=True)
    assert (labels > 0).sum() > 1000


def test_one_series_with_a_gap_between_stations_is_segmented_block_by_block(pair, workdir):
    """One series whose slice positions jump (two stations, 56 mm apart): both blocks are segmented, the SEG
    covers every slice, and the bone sits where the phantom's bone is in both blocks."""
    import highdicom as hd

    node, pacs = pair
    ph, paths = write_series(workdir / "gap", seed=67, n_slices=30)
    drop = set(range(12, 18))  # 6 slices of 8 mm missing: a 56 mm step between the blocks
    for k in drop:
        paths[k].unlink()
    kept = [k for k in range(len(paths)) if k not in drop]
    assert storescu(node.port, workdir / "gap").returncode == 0
    series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    job = node.wait_job(series_uid)
    assert job["state"] == "done", job["reason"]
    assert "2 blocks of 12+12 slices with gaps of 56.0 mm" in node.cli("show", str(job["job"])).stdout
    assert seg_frames(pacs, series_uid) == len(kept)
    seg_path = next(
        p
        for p in pacs.files()
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
        and pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    )
    uids = [pydicom.dcmread(paths[k], stop_before_pixels=True).SOPInstanceUID for k in kept]
    got = (
        hd.seg.segread(seg_path).get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
        > 0
    )
    want = ph.labels[kept] > 0
    for block in (slice(0, 12), slice(12, None)):
        a, b = got[block], want[block]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.85, dice
