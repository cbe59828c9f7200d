"""A correction that arrives before the node's result for its series: recorded ``waiting``, then scored once
the result is encoded, or ``unusable`` in words when the job ends without one.

The node runs scale-out style (``serve`` with ``[worker] enabled = false``, the job loop in a separate
``dicom-node worker`` process started later), so the source series' job is deterministically still queued
when the radiologist's SEG arrives: the same state a busy or stopped worker leaves in production. SEGs are
written the way OHIF writes them and sent by dcmtk's storescu; Dice is checked against an independent numpy
reading of the node's SEG.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from conftest import ENV, ROOT, NodeProcess, PacsSCP, storescu, wait_for, write_series
from correction_writers import numpy_dice, ohif_seg, phantom_classes, read_sources, sent_classes
from sqlalchemy import select

from dicom_node.decide.completion import READING
from inference.labels import DEFAULT_LABELS
from storage.corrections import list_corrections
from storage.models import Correction, Job, Series
from storage.states import JobState


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    p = PacsSCP(tmp_path_factory.mktemp("pacs"))
    yield p
    p.stop(validate=False)  # the node's SEG and SR are validated by the end-to-end tests


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    n = NodeProcess(tmp_path_factory.mktemp("node"), pacs, worker="enabled = false",
                    extra='allowed_calling_aets = ["GOODSCU", "STORESCU", "ECHOSCU"]')
    yield n
    n.stop()
    assert n.proc.returncode in (0, -15), n.log.read_text()[-3000:]


def _correction(node, sop_uid: str, state: str, timeout: float = 60) -> dict:
    def find():
        db = node.db()
        try:
            with db.session() as s:
                cid = s.scalar(select(Correction.id).where(Correction.sop_uid == sop_uid))
            rows = [c for c in list_corrections(db, 500) if c["id"] == cid]
        finally:
            db.dispose()
        return rows[0] if rows and rows[0]["state"] == state else None
    return wait_for(find, timeout, 0.3, f"the correction to be {state}")


def _seg_series_reason(node, seg_series_uid: str) -> str | None:
    db = node.db()
    try:
        with db.session() as s:
            reason = s.scalar(select(Job.reason).join(Series).where(Series.series_uid == seg_series_uid,
                                                                    Job.state == "skipped").order_by(Job.id.desc()))
            return None if reason == READING else reason  # closed, the intake's thread still reading it
    finally:
        db.dispose()


def _source_and_correction(node, tmp, seed: int):
    """Send a source series, wait until its job is queued, then send a radiologist's SEG of it (the phantom's
    truth, as OHIF writes it); returns (source paths, truth, SEG dataset, job id)."""
    ph, paths = write_series(tmp / f"src{seed}", seed=seed, n_slices=20, size=96)
    r = storescu(node.port, *paths)
    assert r.returncode == 0, r.stderr
    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    job = node.wait_job(uid, states=("queued",), timeout=60)
    sources = read_sources(paths)
    truth = phantom_classes(ph, sources)
    out = ohif_seg(sources, truth, tmp / f"ohif{seed}.dcm")
    r = storescu(node.port, out, flags=("-R",))
    assert r.returncode == 0, r.stdout + r.stderr
    return paths, truth, pydicom.dcmread(out), job["job"]


def test_correction_before_the_result_waits_then_is_scored_or_settled(node, pacs, tmp_path):
    paths, truth, seg, job = _source_and_correction(node, tmp_path, seed=21)
    waiting = _correction(node, seg.SOPInstanceUID, "waiting")
    assert f"job {job} is queued" in waiting["reason"] and waiting["job"] is None
    assert waiting["series_uid"] == pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    assert "waiting for the node's result" in wait_for(lambda: _seg_series_reason(node, seg.SeriesInstanceUID),
                                                       30, 0.3, "the SEG series to be closed")
    listed = node.cli("corrections", "--json", "--state", "waiting")
    assert listed.returncode == 0, listed.stderr
    assert [c["id"] for c in json.loads(listed.stdout)] == [waiting["id"]]

    # a second one whose job then ends without a result (as a worker that failed it leaves it)
    _, _, seg2, job2 = _source_and_correction(node, tmp_path, seed=22)
    _correction(node, seg2.SOPInstanceUID, "waiting")
    db = node.db()
    try:
        with db.session() as s:
            s.get(Job, job2).state = JobState.FAILED
    finally:
        db.dispose()
    settled = _correction(node, seg2.SOPInstanceUID, "unusable")
    assert f"job {job2} for the referenced series ended without a result (failed)" in settled["reason"]
    assert "not usable as a correction" in wait_for(
        lambda: (lambda r: r if r and "waiting" not in r else None)(_seg_series_reason(node, seg2.SeriesInstanceUID)),
        30, 0.3, "the SEG series' reason once its correction is settled")

    # the worker comes up, segments the first series; the waiting correction is scored against that result
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(node.config), "worker"],
                                  cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            node.wait_job(waiting["series_uid"], timeout=180)
            c = _correction(node, seg.SOPInstanceUID, "corrected")
        finally:
            worker.terminate()
            worker.wait(30)
    assert c["id"] == waiting["id"] and c["job"] == job and c["received_at"] == waiting["received_at"]
    db = node.db()
    try:
        with db.session() as s:
            seg_path = node.data_dir / s.get(Job, job).seg_path
            jobs = s.scalars(select(Job.state).join(Series).where(Series.series_uid == seg.SeriesInstanceUID)).all()
    finally:
        db.dispose()
    assert jobs == ["skipped"]  # the SEG series itself was never segmented
    assert wait_for(
        lambda: (lambda r: r if r and "waiting" not in r else None)(_seg_series_reason(node, seg.SeriesInstanceUID)),
        30, 0.3, "the SEG series' reason once its correction is settled").startswith(
        "segmentation object: taken as a correction")
    sent = sent_classes(seg_path, read_sources(paths))
    for lab in DEFAULT_LABELS:
        a, b = sent == lab.value, truth == lab.value
        if a.any() or b.any():
            assert abs(c["metrics"][lab.name.lower()]["dice"] - numpy_dice(a, b)) < 0.02, lab.name
    assert (node.data_dir / c["labels_path"]).is_file()
    # what reached the PACS is the first job's SEG and SR, never a correction
    received = wait_for(lambda: pacs.files() if len(pacs.files()) >= 2 else None, 60, 0.3, "the results to arrive")
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in received}
    assert seg.SOPInstanceUID not in sops and seg2.SOPInstanceUID not in sops and len(sops) == 2
