"""Review of held results without the model: the release decision per policy, one decision per held job,
and the dashboard's plain POST forms (a real uvicorn server on a free port)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import free_port, wait_for

from dicom_node.config import Destination, Settings
from dicom_node.pipeline import Pipeline
from dicom_node.service import open_storage
from storage.models import Event, Job, OutboxItem, Series, Study
from storage.review import decide_review, save_quality


def held_job(tmp_path, policy: str, verdict: str = "fail"):
    settings = Settings()
    settings.node.data_dir = tmp_path / "var"
    settings.destinations = [Destination(name="pacs", port=free_port(), quality_policy=policy, retries=0)]
    db, store = open_storage(settings)
    with db.session() as s:
        st = Study(study_uid="1.2.826.0.1.3680043.8.498.1")
        s.add(st)
        s.flush()
        se = Series(series_uid="1.2.826.0.1.3680043.8.498.2", study_id=st.id, state="queued")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, state="running")
        s.add(job)
        s.flush()
        jid = job.id
    save_quality(db, jid, verdict, f"{verdict}: tibia left: no fibula",
                 [("TIBIA LEFT", verdict, "fail: no fibula beside it over 12.0 cm", {"length_cm": 12.0})])
    return settings, db, store, jid


def state(db, jid: int) -> Job:
    with db.session() as s:
        job = s.get(Job, jid)
        s.expunge(job)
        return job


@pytest.mark.parametrize("policy,expected", [("hold", "review"), ("drop", "dropped")])
def test_a_failed_result_is_held_or_dropped_and_nothing_is_sent(tmp_path, policy, expected):
    settings, db, store, jid = held_job(tmp_path, policy)
    assert Pipeline(settings, db, store, None).release_for_delivery(jid, tmp_path) == expected
    job = state(db, jid)
    assert job.state == expected and "tibia left: fail: no fibula" in job.reason
    with db.session() as s:
        assert s.query(OutboxItem).filter(OutboxItem.job_id == jid).count() == 0  # nothing queued to send
    with db.session() as s:
        kinds = [e.kind for e in s.query(Event).filter(Event.job_id == jid).order_by(Event.id)]
    assert kinds[-1] == expected and "quality" in kinds


def test_a_passing_result_without_destinations_is_done(tmp_path):
    settings, db, store, jid = held_job(tmp_path, "hold", verdict="pass")
    settings.destinations = []
    assert Pipeline(settings, db, store, None).release_for_delivery(jid, tmp_path) == "done"


def test_one_decision_per_held_job(tmp_path):
    settings, db, store, jid = held_job(tmp_path, "hold")
    Pipeline(settings, db, store, None).release_for_delivery(jid, tmp_path)
    assert decide_review(db, jid, "approved", "alice (cli)", "ws1", "fine")
    assert not decide_review(db, jid, "approved", "bob (cli)")  # a second approval sends nothing more
    assert not decide_review(db, jid, "rejected", "bob (cli)")
    job = state(db, jid)
    assert (job.state, job.attempts, job.review, job.reviewed_by, job.reviewed_from) == \
        ("queued", 0, "approved", "alice (cli)", "ws1")
    assert job.reviewed_at is not None and job.review_note == "fine"
    with pytest.raises(ValueError):
        decide_review(db, jid, "maybe", "x")


def test_dashboard_form_rejects_and_records_who_and_where(tmp_path):
    from dicom_node.watch.web import WebServer, create_app

    settings, db, store, jid = held_job(tmp_path, "hold")
    Pipeline(settings, db, store, None).release_for_delivery(jid, tmp_path)
    port = free_port()
    server = WebServer(create_app(settings, db), "127.0.0.1", port)
    server.start()
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return urllib.request.urlopen(f"{base}/healthz", timeout=5).status in (200, 503)
            except OSError:
                return False

        wait_for(up, 30, 0.2, "the dashboard")
        page = urllib.request.urlopen(f"{base}/jobs/{jid}", timeout=30).read().decode()
        import re

        action = re.search(rf'<form method="post" action="({jid}/reject\?csrf_token=[^"]+)"', page)
        assert action and "Held for review" in page
        form = urllib.parse.urlencode({"reviewer": "Dr Form", "reason": "tibia missed"}).encode()
        # without the page's CSRF token (a cross-site form) the decision is refused and nothing changes
        forged = urllib.request.Request(f"{base}/jobs/{jid}/reject", data=form, method="POST",
                                        headers={"Origin": "http://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(forged, timeout=30)
        assert e.value.code == 403 and state(db, jid).state == "review"
        r = urllib.request.urlopen(urllib.request.Request(f"{base}/jobs/{action.group(1)}", data=form, method="POST",
                                                          headers={"Origin": base}), timeout=30)
        assert r.status == 200 and r.url.endswith(f"/jobs/{jid}")  # redirected back to the job page
        assert "rejected by Dr Form" in r.read().decode()
        job = state(db, jid)
        assert (job.state, job.review, job.reviewed_by, job.reviewed_from, job.review_note) == \
            ("rejected", "rejected", "Dr Form (dashboard on loopback)", "127.0.0.1", "tibia missed")
        again = urllib.request.Request(f"{base}/jobs/{action.group(1).replace('reject', 'approve')}", data=form,
                                       method="POST", headers={"Origin": base})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(again, timeout=30)
        assert e.value.code == 409
    finally:
        server.stop()
        db.dispose()
