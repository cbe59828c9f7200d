"""The quality gate through the running node: a result the model got wrong is held, approved once, rejected
for good, sent flagged, or dropped, as each destination's ``quality_policy`` says.

The wrong result is real: the phantom's slices are written in reverse order under unchanged positions (as
when a feet-first scan is labelled head-first), the bundled model segments every slice as it sees it, and the
gate has to notice that the tibia now lies above the femur. (An earlier version inverted the contrast; the
domain-randomised model v0.2.0 segments inverted images correctly, so that no longer makes a wrong result.) The PACS is
dcmtk's storescp, which checks every SEG and SR it received with dciodvfy when it stops.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, wait_for

TOKEN = "quality-gate-test-token"


def corrupted_series(folder: Path, seed: int) -> tuple[str, str]:
    """A thigh-knee phantom whose slices are upside down (positions unchanged); returns (study, series UID)."""
    from inference.phantom import small_series
    from inference.phantom_io import write_dicom_series
    ph = small_series(seed=seed, n_slices=24, size=128)
    ph = dataclasses.replace(ph, image=np.ascontiguousarray(ph.image[::-1]))
    paths = write_dicom_series(ph, folder, seed=seed)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


def results_at(pacs: PacsSCP, study_uid: str) -> list[pydicom.Dataset]:
    out = []
    for p in pacs.files():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid and ds.Modality in ("SEG", "SR"):
            out.append(ds)
    return out


def http(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def web_up(base: str) -> bool:
    try:
        return http(f"{base}/healthz")[0] in (200, 503)
    except urllib.error.URLError:
        return False


def job_of(node: NodeProcess, series_uid: str) -> dict:
    return next(j for j in node.jobs() if j["series_uid"] == series_uid)


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A node with the default policy (hold) and two corrupted series waiting for review."""
    tmp = tmp_path_factory.mktemp("gate")
    pacs = PacsSCP(tmp / "pacs")
    node = NodeProcess(tmp, pacs, web=f'token = "{TOKEN}"', tta=True)
    series = []
    try:
        for seed in (61, 62):
            study, uid = corrupted_series(tmp / f"s{seed}", seed)
            assert storescu(node.port, tmp / f"s{seed}").returncode == 0
            series.append((study, uid))
        for _, uid in series:
            node.wait_job(uid, states=("review", "done", "failed", "skipped"))
        yield tmp, pacs, node, series
    finally:
        node.stop()
        pacs.stop()


def test_a_wrong_result_is_held_and_shown_for_review(held):
    tmp, pacs, node, series = held
    for study, uid in series:
        job = job_of(node, uid)
        assert job["state"] == "review", job
        assert job["quality"] == "fail"
        assert any(q["verdict"] == "fail" and q["reason"] for q in job["quality_checks"])
        assert "held for review" in job["reason"]
        assert results_at(pacs, study) == []  # nothing reached the PACS
    job = job_of(node, series[0][1])
    shown = node.cli("show", str(job["job"])).stdout
    assert "quality: fail" in shown and "review" in shown
    listed = node.cli("jobs").stdout
    assert "quality: fail" in listed and "held:" in listed
    base = f"http://127.0.0.1:{node.web_port}"
    status, page = http(f"{base}/jobs/{job['job']}")
    page = page.decode()
    assert status == 200 and 'id="approve"' in page and 'id="reject"' in page and 'id="quality"' in page
    assert f'action="{job["job"]}/approve?csrf_token=' in page and 'method="post"' in page
    failed = next(q["structure"] for q in job["quality_checks"] if q["metrics"].get("volume_cm3"))
    status, png = http(f"{base}/jobs/{job['job']}/preview.png?structure={failed.replace(' ', '%20')}")
    assert status == 200 and png[:4] == b"\x89PNG"
    assert http(f"{base}/jobs/{job['job']}/preview.png?structure=..%2F..%2Fetc")[0] == 404
    status, metrics = http(f"{base}/metrics")
    assert b'dicomnode_quality_total{verdict="fail"} 2.0' in metrics
    assert b'dicomnode_jobs{state="review"} 2.0' in metrics and b"dicomnode_review_waiting 2.0" in metrics


def test_held_job_survives_a_restart_then_approval_sends_exactly_once(held):
    tmp, pacs, node, series = held
    study, uid = series[0]
    jid = job_of(node, uid)["job"]
    node.stop()
    node.__init__(tmp, pacs, web=f'token = "{TOKEN}"')  # same folder and database, a new process
    time.sleep(2)  # several worker polls: a held job is not taken up again by itself
    assert job_of(node, uid)["state"] == "review" and results_at(pacs, study) == []
    base = f"http://127.0.0.1:{node.web_port}"
    wait_for(lambda: web_up(base), 60, 0.3, "the dashboard after the restart")
    status, body = http(f"{base}/api/jobs/{jid}/approve", "POST", {"reviewer": "Dr Test", "reason": "looked fine"})
    assert status == 200, body
    assert http(f"{base}/api/jobs/{jid}/approve", "POST", {"reviewer": "Dr Twice"})[0] == 409  # only once
    job = node.wait_job(uid)
    assert job["state"] == "done", job
    assert job["review"]["decision"] == "approved" and job["review"]["by"].startswith("Dr Test")
    assert job["review"]["from"] == "127.0.0.1" and job["review"]["at"]
    assert node.cli("approve", str(jid)).returncode == 1  # not waiting for review any more
    wait_for(lambda: len(results_at(pacs, study)) == 2, 30, 0.3, "the SEG and SR at the PACS")
    time.sleep(2)
    sent = results_at(pacs, study)
    assert sorted(d.Modality for d in sent) == ["SEG", "SR"]  # exactly once
    assert sum(d["ok"] for d in job["deliveries"]) == 1
    kinds = [e["kind"] for e in json.loads(http(f"{base}/api/jobs/{jid}")[1])["timeline"] if e["job"] == jid]
    assert kinds.index("quality") < kinds.index("review") < kinds.index("approved") < kinds.index("delivered")


def test_rejected_job_is_never_sent(held):
    tmp, pacs, node, series = held
    study, uid = series[1]
    jid = job_of(node, uid)["job"]
    r = node.cli("reject", str(jid), "--reason", "tibia missed")
    assert r.returncode == 0, r.stderr
    assert node.cli("approve", str(jid)).returncode == 1  # a rejection is final
    time.sleep(2)
    job = job_of(node, uid)
    assert job["state"] == "rejected" and job["review"]["decision"] == "rejected"
    assert job["review"]["note"] == "tibia missed" and job["review"]["by"].endswith("(cli)")
    assert job["deliveries"] == [] and results_at(pacs, study) == []
    assert "rejected by" in node.cli("show", str(jid)).stdout


def test_send_flagged_and_drop_per_destination(tmp_path):
    """One job, two destinations: one takes failed results flagged, the other never gets them."""
    flagged, dropped = PacsSCP(tmp_path / "flagged"), PacsSCP(tmp_path / "dropped", aet="ARCHIVE")
    more = (f'[[destinations]]\nname = "archive"\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = {dropped.port}\n'
            'retries = 0\nquality_policy = "drop"\n')
    node = NodeProcess(tmp_path, flagged, dest_extra='quality_policy = "send_flagged"', more=more, tta=True)
    try:
        study, uid = corrupted_series(tmp_path / "s", 63)
        assert storescu(node.port, tmp_path / "s").returncode == 0
        job = node.wait_job(uid)
        assert job["state"] == "done" and job["quality"] == "fail", job
        assert [d["destination"] for d in job["deliveries"] if d["ok"]] == ["pacs"]
        sent = wait_for(lambda: len(results_at(flagged, study)) == 2 and results_at(flagged, study), 30, 0.3, "results")
        seg = next(d for d in sent if d.Modality == "SEG")
        sr = next(d for d in sent if d.Modality == "SR")
        assert seg.SeriesDescription.startswith("QC FAILED ") and sr.SeriesDescription.startswith("QC FAILED ")
        failed = [q["structure"] for q in job["quality_checks"] if q["verdict"] == "fail"]
        first = failed[0].lower().split()
        assert first[0] in seg.SeriesDescription
        evaluations = [str(item.ConceptCodeSequence[0].CodeValue) for item in _walk(sr)
                       if item.get("ValueType") == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "QC-GATE"]
        assert "QC-FAIL" in evaluations
        assert results_at(dropped, study) == []
        shown = node.cli("show", str(job["job"])).stdout
        assert "not sent to archive (quality_policy drop)" in shown
        # the result stays on the node
        assert Path(next(f for f in (node.data_dir / "results").rglob("SEG_binary.dcm"))).is_file()
    finally:
        node.stop()
        flagged.stop()
        dropped.stop()


def test_drop_only_keeps_the_result_here(tmp_path):
    pacs = PacsSCP(tmp_path / "pacs")
    node = NodeProcess(tmp_path, pacs, dest_extra='quality_policy = "drop"', tta=True)
    try:
        study, uid = corrupted_series(tmp_path / "s", 64)
        assert storescu(node.port, tmp_path / "s").returncode == 0
        job = node.wait_job(uid, states=("done", "failed", "skipped", "dropped", "review"))
        assert job["state"] == "dropped" and "quality_policy drop" in job["reason"], job
        assert job["deliveries"] == [] and results_at(pacs, study) == [] and job["has_result"]
    finally:
        node.stop()
        pacs.stop()


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
