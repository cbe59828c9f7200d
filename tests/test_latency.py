"""A result's time as the radiologist counts it: from the series' last image to delivery, with a review wait
shown apart (an approved job is run again, and timing it from that last start gave a tenth of a second)."""

from __future__ import annotations

import datetime as dt

from dicom_node.watch.admin import job_rows
from dicom_node.watch.dashboard_data import hourly
from storage.db import Database
from storage.models import Event, Job, Series, Study, utcnow
from storage.review import decide_review, hold_for_review
from storage.states import JobState, ReviewDecision


def test_an_approved_job_counts_from_its_last_image_and_shows_its_review_wait(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    now = utcnow()
    last_image = now - dt.timedelta(seconds=400)
    with db.session() as s:
        st = Study(study_uid="1.2.826.0.1.3680043.8.498.11")
        s.add(st)
        s.flush()
        se = Series(series_uid="1.2.826.0.1.3680043.8.498.12", study_id=st.id, last_received_at=last_image)
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, state=JobState.RUNNING, created_at=last_image + dt.timedelta(seconds=5))
        s.add(job)
        s.flush()
        jid = job.id
    hold_for_review(db, jid, "held: pelvis left: too small")
    assert decide_review(db, jid, ReviewDecision.APPROVED, "dr. who")
    with db.session() as s:
        # the hold 30 s after the last image; the decision 300 s later; the re-run then takes 0.1 s
        ev = s.query(Event).filter(Event.job_id == jid, Event.kind == "review").one()
        ev.at = last_image + dt.timedelta(seconds=30)
        job = s.get(Job, jid)
        job.reviewed_at = last_image + dt.timedelta(seconds=330)
        job.started_at = last_image + dt.timedelta(seconds=340)
        job.finished_at = job.started_at + dt.timedelta(seconds=0.1)
        job.state = JobState.DONE
    row = job_rows(db, job_id=jid)[0]
    assert row["total_s"] == 340.1
    assert row["review_wait_s"] == 300.0
    hours = [h for h in hourly(db) if h["done"]]
    assert len(hours) == 1 and abs(hours[0]["p50_s"] - 40.1) < 1e-6  # the node's own part: review wait left out


def test_a_job_never_held_has_no_review_wait(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    t0 = utcnow() - dt.timedelta(seconds=60)
    with db.session() as s:
        st = Study(study_uid="1.2.826.0.1.3680043.8.498.21")
        s.add(st)
        s.flush()
        se = Series(series_uid="1.2.826.0.1.3680043.8.498.22", study_id=st.id, last_received_at=t0)
        s.add(se)
        s.flush()
        s.add(Job(series_id=se.id, state=JobState.DONE, created_at=t0 + dt.timedelta(seconds=2),
                  started_at=t0 + dt.timedelta(seconds=3), finished_at=t0 + dt.timedelta(seconds=20)))
    row = job_rows(db)[0]
    assert row["total_s"] == 20.0 and row["review_wait_s"] is None
