"""Reading corrections without a node (fast): frames placed by position when a writer leaves out the source
references, FRACTIONAL SEGs, another grid refused in words, segments matched by code or words, scores per
side, and the completion checker closing a SEG series whatever the intake raises."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import write_series
from correction_writers import ohif_seg, phantom_classes, read_sources
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset

from dicom_node.learn.scoring import score
from dicom_node.learn.segread import SourceGrid, Unusable, match_segment, read_seg, source_grid


def _rows(sources) -> list:
    """The stored-instance rows the node would hold for these files (the fields the grid is built from)."""
    return [SimpleNamespace(sop_uid=d.SOPInstanceUID, rows=d.Rows, columns=d.Columns, frames=1, id=k,
                            frame_of_reference_uid=d.FrameOfReferenceUID, image_type="", received_at=None,
                            orientation="\\".join(str(v) for v in d.ImageOrientationPatient),
                            position="\\".join(str(v) for v in d.ImagePositionPatient),
                            pixel_spacing="\\".join(str(v) for v in d.PixelSpacing)) for k, d in enumerate(sources)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("read")
    ph, paths = write_series(tmp / "src", seed=21, n_slices=14, size=64)
    sources = read_sources(paths)
    truth = phantom_classes(ph, sources)
    grid = source_grid(_rows(sources))
    order = [{d.SOPInstanceUID: k for k, d in enumerate(sources)}[u] for u in grid.sop_uids]
    return SimpleNamespace(tmp=tmp, sources=sources, truth=truth, grid=grid, stacked=truth[order])


def test_frames_without_source_references_are_placed_by_position(case):
    path = ohif_seg(case.sources, case.truth, case.tmp / "ref.dcm")
    with_refs = read_seg(path, case.grid)
    assert np.array_equal(with_refs.classes, case.stacked) and with_refs.by_position == 0
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    del ds.ReferencedSeriesSequence
    by_pos = read_seg(ds, case.grid)
    assert np.array_equal(by_pos.classes, case.stacked) and by_pos.by_reference == 0 and by_pos.by_position > 0
    # a frame moved off the slices: not guessed onto the nearest one
    plane = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    plane.ImagePositionPatient[2] += 0.4 * case.grid.slice_spacing
    with pytest.raises(Unusable, match="lies on no slice"):
        read_seg(ds, case.grid)


def test_fractional_seg_counts_from_half_the_maximum(case):
    prob = np.where(case.truth == 1, 0.7, 0.0) + np.where(case.truth == 2, 0.3, 0.0)  # tibia below half
    seg = hd.seg.Segmentation(
        source_images=case.sources, pixel_array=prob.astype(np.float32)[..., None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Femur probability",
            segmented_property_category=CodedConcept("85756007", "SCT", "Tissue"),
            segmented_property_type=CodedConcept("85756007", "SCT", "Tissue"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="0")
    got = read_seg(seg, case.grid)
    assert np.array_equal(got.classes == 1, case.stacked == 1) and not (got.classes == 2).any()


def test_another_frame_of_reference_or_matrix_is_unusable(case):
    path = ohif_seg(case.sources, case.truth, case.tmp / "grid.dcm")
    other = SourceGrid(**{**case.grid.__dict__, "frame_of_reference_uid": "1.2.3"})
    with pytest.raises(Unusable, match="Frame of Reference"):
        read_seg(path, other)
    bigger = SourceGrid(**{**case.grid.__dict__, "rows": case.grid.rows * 2})
    with pytest.raises(Unusable, match="different grid"):
        read_seg(path, bigger)
    with pytest.raises(Unusable, match="not a Segmentation"):
        read_seg(Path(case.tmp / "src").iterdir().__next__(), case.grid)


def _item(label: str = "", code: tuple[str, str, str] = ("T-D0050", "SRT", "Tissue"), description: str = "") -> Dataset:
    item = Dataset()
    item.SegmentLabel = label
    if description:
        item.SegmentDescription = description
    prop = Dataset()
    prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning = code
    item.SegmentedPropertyTypeCodeSequence = [prop]
    return item


@pytest.mark.parametrize("item, name, how", [
    (_item("Left femur"), "FEMUR", "label"),
    (_item("femur_R"), "FEMUR", "label"),
    (_item("Segment 1", description="Tibia"), "TIBIA", "label"),
    (_item("hip bone"), "PELVIS", "label"),
    (_item("Os coxae"), "PELVIS", "label"),
    (_item("pelvis"), "PELVIS", "label"),
    (_item("Segment", ("71341001", "SCT", "Femur")), "FEMUR", "code"),
    (_item("Whatever", ("29836001", "SCT", "Hip")), "PELVIS", "code"),
    (_item("FibulaLeft"), "FIBULA", "label"),
    (_item("Liver"), None, "no known structure"),
    (_item("Femur and tibia"), None, "several"),
])
def test_segments_match_by_code_then_words(item, name, how):
    lab, found = match_segment(item)
    assert (lab.name if lab else None) == name
    assert how in found


def test_scores_per_side_from_patient_coordinates(case):
    sent = case.stacked.copy()
    sent[:, :, :24] = 0  # the patient's right (low x) missing from what was "sent"
    metrics, mean = score(sent, case.stacked, case.grid)
    assert metrics["femur_left"]["dice"] == 1.0 and metrics["femur_right"]["dice"] < 0.99
    assert metrics["femur"]["volume_diff_cm3"] > 0  # the correction has more femur than was sent
    present = [k for k in ("femur", "tibia", "fibula", "pelvis") if k in metrics]
    assert mean == pytest.approx(np.mean([metrics[k]["dice"] for k in present]), abs=1e-3)
    same, one = score(case.stacked, case.stacked, case.grid)
    assert one == 1.0 and all(v["volume_diff_cm3"] == 0 for v in same.values())


def test_completion_closes_a_seg_series_whatever_the_intake_raises(tmp_path):
    from sqlalchemy import select

    from dicom_node.config import Settings
    from dicom_node.decide.completion import Completion
    from storage.db import Database
    from storage.instances import InstanceMeta, Recorder
    from storage.models import Job

    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    touched: list[set[int]] = []
    rec = Recorder(db, on_series=touched.append)
    rec.record(InstanceMeta(sop_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", study_uid="1.2",
                            series_uid="1.2.8", modality="SEG", frames=4), "/x", 1, "OHIF")
    sid = touched[0].pop()
    check = Completion(Settings(), db)
    calls: list[int] = []

    def broken(series_id: int) -> str:
        calls.append(series_id)
        raise RuntimeError("boom")

    check.on_segmentation = broken
    assert check.judge(sid, 1, "test") is not None
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.series_id == sid)).one()
        assert job.state == "skipped" and job.reason.startswith("segmentation object not usable as a correction")
    assert calls == [sid]
    db.dispose()


def test_intake_thread_reads_what_a_stop_left_and_words_what_raises(tmp_path):
    """The intake runs off the completion thread: a series the completion checker closed as "being read" is
    read on the intake's thread and its reason rewritten; one a stop left unread is read at the next start;
    whatever reading raises ends as a reason in words, and the thread goes on."""
    from sqlalchemy import select

    from dicom_node.config import Settings
    from dicom_node.decide.completion import READING, Completion
    from dicom_node.learn.intake import Intake, IntakeThread
    from storage.db import Database
    from storage.instances import InstanceMeta, Recorder
    from storage.models import Job

    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    touched: list[set[int]] = []
    rec = Recorder(db, on_series=touched.append)
    ids = []
    for k in range(3):
        rec.record(InstanceMeta(sop_uid=f"1.2.3.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", study_uid="1.2",
                                series_uid=f"1.2.8.{k}", modality="SEG", frames=4), "/x", 1, "OHIF")
        ids.append(touched.pop().pop())

    read: list[int] = []

    class Flaky(Intake):
        def __call__(self, series_id: int) -> str:
            read.append(series_id)
            if series_id == ids[1]:
                raise RuntimeError("boom")
            return f"read {series_id}"

    def reason(sid: int) -> str:
        with db.session() as s:
            return s.scalars(select(Job.reason).where(Job.series_id == sid)).one()

    check = Completion(Settings(), db)
    queued: list[int] = []
    check.on_segmentation = queued.append  # no intake running: as a node stopped right after closing them
    for sid in ids[:2]:
        assert check.judge(sid, 1, "test") is not None
    assert queued == ids[:2] and all(reason(sid) == READING for sid in ids[:2])

    # the next start: the two left "being read" are read first, then the third as the checker closes it
    intake = IntakeThread(Flaky(db, tmp_path))
    check.on_segmentation = intake.submit
    intake.start()
    try:
        assert check.judge(ids[2], 1, "test") is not None
        deadline = time.monotonic() + 20
        while any(reason(sid) == READING for sid in ids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        intake.stop(5)
    assert read == ids
    assert reason(ids[0]) == f"read {ids[0]}" and reason(ids[2]) == f"read {ids[2]}"
    assert reason(ids[1]).startswith("segmentation object not usable as a correction")
    db.dispose()
