"""Corrections in (issue 27, part 1): SEGs written the way OHIF, 3D Slicer (dcmqi) and an unedited re-save
write them, sent to a running node by dcmtk's storescu, become rows of ``dicom-node corrections`` — scored
against what the node sent (checked against an independent numpy Dice), unchanged, ignored (the node's own
SEG coming back) or unusable in words — and are never segmented or sent anywhere.

One node for the module (the source series is segmented once); each test sends its SEGs as a new series.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import PacsSCP, storescu, wait_for, write_series
from correction_writers import (
    copy_as_new_instance,
    dcmqi_seg,
    numpy_dice,
    ohif_seg,
    phantom_classes,
    read_sources,
    sent_classes,
)
from sqlalchemy import select

from dicom_node.decide.completion import READING
from inference.labels import DEFAULT_LABELS
from storage.corrections import list_corrections
from storage.models import Instance, Job, Series


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """The destination, without the validators' pass over what it received at the end (half a minute of
    dciodvfy and Java): the node's SEG and SR are validated by the end-to-end tests; here the PACS only has
    to show that nothing is sent for a correction."""
    p = PacsSCP(tmp_path_factory.mktemp("pacs"))
    yield p
    p.stop(validate=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    """The shared node's configuration, with an accuracy floor no demo result reaches, so that the third
    scored correction must raise accuracy-drop (the intake's call into the accuracy check)."""
    from conftest import NodeProcess

    n = NodeProcess(tmp_path_factory.mktemp("node"), pacs,
                    extra='allowed_calling_aets = ["GOODSCU", "STORESCU", "DICOMNODE", "ECHOSCU"]',
                    more="[learning]\naccuracy_floor = 0.999\naccuracy_window = 3\n")
    yield n
    n.stop()
    assert n.proc.returncode in (0, -15), n.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def loop(node, pacs: PacsSCP, tmp_path_factory):
    """The node with one segmented source series: (node, pacs, work folder, source paths, truth, job row)."""
    tmp = tmp_path_factory.mktemp("corr")
    ph, paths = write_series(tmp / "src", seed=7, n_slices=24, size=96)
    r = storescu(node.port, *paths)
    assert r.returncode == 0, r.stderr
    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    job = node.wait_job(uid, timeout=180)
    assert job["state"] == "done", job
    db = node.db()
    with db.session() as s:
        row = s.scalars(select(Job).join(Series).where(Series.series_uid == uid)).one()
        seg_path, seg_sop = node.data_dir / row.seg_path, row.seg_sop_uid
    db.dispose()
    truth = phantom_classes(ph, read_sources(paths))
    return {"node": node, "pacs": pacs, "tmp": tmp, "paths": paths, "truth": truth, "seg": seg_path,
            "seg_sop": seg_sop, "series_uid": uid, "job": job["job"]}


def _send(loop, *files: Path) -> None:
    r = storescu(loop["node"].port, *files, flags=("-R",))  # dcmtk proposes SEG only for the files it holds
    assert r.returncode == 0, r.stdout + r.stderr


def _send_pynetdicom(loop, path: Path) -> None:
    """C-STORE with pynetdicom: Debian's dcmtk (3.6.7) refuses the Label Map Segmentation class (2024) as an
    "unknown storage SOP class" in the file, so OHIF's newest default is sent by the other DICOM stack."""
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", loop["node"].port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0, status
    finally:
        assoc.release()


def _correction(loop, sop_uid: str, timeout: float = 60) -> dict:
    """The correction's row once the intake has finished with it: a corrected row is recorded with its scores
    first and its labels file right after (intake.py), so until that file is named the row is still being
    written (a loaded machine showed the gap)."""
    def find():
        db = loop["node"].db()
        try:
            c = next((c for c in list_corrections(db, 500) if c["id"] and _sop(db, c["id"]) == sop_uid), None)
            return None if c is not None and c["state"] == "corrected" and not c["labels_path"] else c
        finally:
            db.dispose()
    return wait_for(find, timeout, 0.3, "the correction to be recorded")


def _sop(db, cid: int) -> str:
    from storage.models import Correction

    with db.session() as s:
        return s.scalar(select(Correction.sop_uid).where(Correction.id == cid)) or ""


def _series_reason(loop, series_uid: str, timeout: float = 60) -> str:
    def find():
        db = loop["node"].db()
        try:
            with db.session() as s:
                reason = s.scalar(select(Job.reason).join(Series).where(Series.series_uid == series_uid,
                                                                        Job.state == "skipped")
                                  .order_by(Job.id.desc()))
                return None if reason == READING else reason  # closed, the intake's thread still reading it
        finally:
            db.dispose()
    return wait_for(find, timeout, 0.3, "the SEG series to be closed and read")


def test_ohif_binary_correction_is_scored_against_what_was_sent(loop):
    sources = read_sources(loop["paths"])
    out = ohif_seg(sources, loop["truth"], loop["tmp"] / "ohif.dcm")
    _send(loop, out)
    c = _correction(loop, pydicom.dcmread(out).SOPInstanceUID)
    assert c["state"] == "corrected", c
    assert c["series_uid"] == loop["series_uid"] and c["job"] == loop["job"]
    assert c["calling_ae"] == "STORESCU" and c["station"] == "Unspecified OHIF Viewer"
    sent = sent_classes(loop["seg"], sources)
    assert not np.array_equal(sent, loop["truth"])
    for lab in DEFAULT_LABELS:
        a, b = sent == lab.value, loop["truth"] == lab.value
        if a.any() or b.any():
            assert abs(c["metrics"][lab.name.lower()]["dice"] - numpy_dice(a, b)) < 0.02, lab.name
    # OHIF wrote "Right tibia" / "Left tibia": merged into the tibia, scored per side from coordinates
    assert {"tibia_left", "tibia_right", "femur_left", "femur_right"} <= set(c["metrics"])
    assert c["mean_dice"] == pytest.approx(np.mean([c["metrics"][k]["dice"] for k in
                                                    ("femur", "tibia", "fibula", "pelvis") if k in c["metrics"]]),
                                           abs=1e-3)
    labels = np.load(loop["node"].data_dir / c["labels_path"])
    by_uid = {d.SOPInstanceUID: k for k, d in enumerate(sources)}  # the .npz is in stacked order
    assert sorted(labels["sop_uids"]) == sorted(by_uid)
    assert np.array_equal(labels["classes"], loop["truth"][[by_uid[u] for u in labels["sop_uids"]]])
    assert c["labels_path"] == f"corrections/{c['id']}.npz"
    loop["ohif"] = c


def test_label_map_seg_rle_is_read_the_same(loop):
    sources = read_sources(loop["paths"])
    out = ohif_seg(sources, loop["truth"], loop["tmp"] / "labelmap.dcm", labelmap=True)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    _send_pynetdicom(loop, out)
    c = _correction(loop, ds.SOPInstanceUID)
    assert c["state"] == "corrected", c
    assert c["metrics"] == loop["ohif"]["metrics"]  # same truth: the same scores as the binary SEG


def test_dcmqi_slicer_seg_automatic_is_a_correction(loop):
    out = dcmqi_seg(loop["paths"], loop["truth"], loop["tmp"] / "dcmqi.dcm", loop["tmp"] / "dcmqi")
    ds = pydicom.dcmread(out)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    _send(loop, out)
    c = _correction(loop, ds.SOPInstanceUID)
    assert c["state"] == "corrected", c
    assert c["creator"] == "Slicer"
    assert c["metrics"]["femur"]["dice"] == pytest.approx(loop["ohif"]["metrics"]["femur"]["dice"], abs=1e-4)


def test_third_scored_correction_below_the_floor_raises_accuracy_drop(loop):
    """Three corrections (OHIF binary, label map, Slicer) under a floor of 0.999: the intake's check records
    accuracy-drop (the webhook's record) for the serving version, once per structure."""
    from storage.models import Event
    from storage.states import EventKind

    def drops():
        db = loop["node"].db()
        try:
            with db.session() as s:
                return s.scalars(select(Event.detail).where(Event.kind == EventKind.ACCURACY_DROP)).all()
        finally:
            db.dispose()

    found = wait_for(drops, 20, 0.2, "an accuracy-drop event")
    assert len(found) == len(set(found)), found  # one per structure, not one per correction


def test_own_seg_echoed_is_ignored_and_an_unchanged_copy_is_recorded_as_such(loop):
    own = pydicom.dcmread(loop["seg"])
    n_pacs = len(loop["pacs"].files())
    _send(loop, loop["seg"])
    assert "own result" in _series_reason(loop, own.SeriesInstanceUID)
    db = loop["node"].db()
    try:
        assert _sop_rows(db, own.SOPInstanceUID) == 0
    finally:
        db.dispose()
    # OHIF saving the loaded result unedited into the node's own series: a new instance, same labels
    copy = copy_as_new_instance(loop["seg"], loop["tmp"] / "copy.dcm", same_series=True)
    _send(loop, copy)
    c = _correction(loop, pydicom.dcmread(copy).SOPInstanceUID)
    assert c["state"] == "unchanged" and c["mean_dice"] is None
    db = loop["node"].db()
    try:
        assert _sop_rows(db, own.SOPInstanceUID) == 0  # judged again: still ignored, still no row
    finally:
        db.dispose()
    assert len(loop["pacs"].files()) == n_pacs


def _sop_rows(db, sop_uid: str) -> int:
    from storage.models import Correction

    with db.session() as s:
        return len(s.scalars(select(Correction.id).where(Correction.sop_uid == sop_uid)).all())


def test_seg_for_images_the_node_never_saw_is_unusable(loop):
    ph, paths = write_series(loop["tmp"] / "unseen", seed=11, n_slices=12, size=64)
    sources = read_sources(paths)
    out = ohif_seg(sources, phantom_classes(ph, sources), loop["tmp"] / "unseen.dcm")
    n_pacs = len(loop["pacs"].files())
    _send(loop, out)
    ds = pydicom.dcmread(out)
    c = _correction(loop, ds.SOPInstanceUID)
    assert c["state"] == "unusable" and "holds none of the images" in c["reason"]
    assert c["job"] is None and c["series_id"] is None
    assert "not usable as a correction" in _series_reason(loop, ds.SeriesInstanceUID)
    db = loop["node"].db()
    try:
        with db.session() as s:  # no job but the skipped one of the SEG series itself
            states = s.scalars(select(Job.state).join(Series).where(Series.series_uid == ds.SeriesInstanceUID)).all()
            assert states == ["skipped"]
            assert s.scalar(select(Series.id).where(Series.series_uid == sources[0].SeriesInstanceUID)) is None
    finally:
        db.dispose()
    assert len(loop["pacs"].files()) == n_pacs


def test_unknown_segments_only_is_unusable(loop):
    out = ohif_seg(read_sources(loop["paths"]), loop["truth"], loop["tmp"] / "liver.dcm", sided=(),
                   rename=lambda words: "Liver")
    _send(loop, out)
    c = _correction(loop, pydicom.dcmread(out).SOPInstanceUID)
    assert c["state"] == "unusable" and "no segment matched" in c["reason"] and "Liver" in c["reason"]
    assert c["job"] == loop["job"]  # it does refer to the segmented series


def test_cli_lists_and_deletes_and_the_purge_keeps_corrected_images(loop):
    from storage.corrections import delete_correction
    from storage.instances import purge_delivered_images
    from storage.timeline import audit_log

    node = loop["node"]
    r = node.cli("corrections", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"corrected", "unchanged", "unusable"} <= {x["state"] for x in rows}
    text = node.cli("corrections").stdout
    assert "mean Dice" in text and "femur" in text and "Slicer" in text
    db = node.db()
    try:
        purge_delivered_images(db, 0, node.data_dir)
        assert all(_source_paths(db, loop["series_uid"]))  # kept: the series has corrections
        corrected = [x for x in rows if x["state"] == "corrected"]
        assert len(corrected) == 3
        r = node.cli("corrections", "--delete", str(corrected[0]["id"]))
        assert r.returncode == 0 and "deleted" in r.stdout, r.stdout + r.stderr
        for x in corrected[1:]:  # the command's own function, without a process each
            assert "deleted" in delete_correction(db, x["id"], node.data_dir, "cli:test")
        assert not any((node.data_dir / x["labels_path"]).exists() for x in corrected)
        after = {x["id"]: x for x in list_corrections(db)}
        assert all(after[x["id"]]["state"] == "deleted" and not after[x["id"]]["labels_path"] for x in corrected)
        assert sum(a["action"] == "delete-correction" and a["actor"].startswith("cli:") for a in audit_log(db)) \
            == len(corrected)
        assert node.cli("corrections", "--delete", "99999").returncode == 1
        purge_delivered_images(db, 0, node.data_dir)
        assert not any(_source_paths(db, loop["series_uid"]))  # purgeable again
    finally:
        db.dispose()


def _source_paths(db, series_uid: str) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Instance.path).join(Series).where(Series.series_uid == series_uid)))
