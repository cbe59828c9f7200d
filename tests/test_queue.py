"""The database side of ingest and the queue: stored once, late instances reopen a series, claims are atomic."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from storage.db import Database
from storage.instances import InstanceMeta, Recorder
from storage.jobs import claim_job, mark_judged, set_state
from storage.models import Event, Job, Series
from storage.series import stable_series


def meta(i: int, series: str = "1.2.3.1") -> InstanceMeta:
    return InstanceMeta(sop_uid=f"1.2.3.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid="1.2.3",
                        series_uid=series, modality="MR", body_part="LEG", rows=8, columns=8,
                        position=f"0\\0\\{i}", orientation="1\\0\\0\\0\\1\\0", pixel_spacing="1\\1")


def test_same_instance_is_recorded_once_even_concurrently(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(rec.record(meta(i % 5), "p", 1))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5
    with db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 5


def test_late_instance_withdraws_queued_job_and_reopens_series(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    for i in range(3):
        rec.record(meta(i), "p", 1)
    time.sleep(0.05)
    (sid,) = stable_series(db, 0.01)
    job = mark_judged(db, sid, queue=True, reason="", expected_count=3)
    assert job is not None
    assert rec.record(meta(3), "p", 1)
    with db.session() as s:
        assert s.get(Series, sid).state == "receiving"
    # the queued job is never run on the old three slices: withdrawn when a worker would take it
    assert claim_job(db) is None
    with db.session() as s:
        j = s.get(Job, job)
        assert j.state == "skipped" and "superseded" in j.reason
        assert s.scalar(select(Event.detail).where(Event.job_id == job, Event.kind == "skipped")).startswith(
            "superseded"
        )
    # the count guard: a decision made on 3 instances is not applied to a series that now has 4
    assert mark_judged(db, sid, queue=True, reason="", expected_count=3) is None
    assert mark_judged(db, sid, queue=True, reason="", expected_count=4) is not None


def test_claim_takes_urgent_then_oldest_and_never_twice(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    ids = []
    for k, urgent in enumerate((False, False, True)):
        rec.record(meta(k, series=f"1.2.3.{10 + k}"), "p", 1)
        with db.session() as s:
            sid = s.scalar(select(Series.id).where(Series.series_uid == f"1.2.3.{10 + k}"))
        ids.append(mark_judged(db, sid, queue=True, reason="", urgent=urgent))
    got = []
    threads = [threading.Thread(target=lambda: got.append(claim_job(db))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [g for g in got if g is not None]
    assert sorted(claimed) == sorted(ids)  # each job exactly once
    db2 = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db2.create_schema()
    # order: urgent first, then oldest
    rec2 = Recorder(db2)
    order = []
    for k, urgent in enumerate((False, True, False)):
        rec2.record(meta(k, series=f"9.{k}"), "p", 1)
        with db2.session() as s:
            sid = s.scalar(select(Series.id).where(Series.series_uid == f"9.{k}"))
        order.append(mark_judged(db2, sid, queue=True, reason="", urgent=urgent))
    assert [claim_job(db2) for _ in range(3)] == [order[1], order[0], order[2]]


def test_rerun_after_late_instances_supersedes_the_delivered_result(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    for i in range(3):
        rec.record(meta(i), "p", 1)
    time.sleep(0.02)
    (sid,) = stable_series(db, 0.01)
    first = mark_judged(db, sid, queue=True, reason="", expected_count=3)
    assert claim_job(db, "w1") == first
    set_state(db, first, "done", event_detail="")
    rec.record(meta(0), "p", 1)  # identical re-send: no new job, series stays judged
    assert stable_series(db, 0.0) == []
    rec.record(meta(7), "p", 1)  # a genuinely new instance reopens it
    time.sleep(0.02)
    second = mark_judged(db, sid, queue=True, reason="", expected_count=4)
    with db.session() as s:
        assert s.get(Job, first).superseded_by == second
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.series_id == sid).order_by(Event.id))]
    # the identical re-send is on the timeline, counted, and made no job
    assert kinds == ["received", "complete", "queued", "running", "delivered", "duplicates", "complete", "queued",
                     "superseded"]


def test_next_completion_withdraws_a_job_still_queued(tmp_path):
    """No worker ran in between: the new job replaces the queued one, so the series is segmented once."""
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    for i in range(3):
        rec.record(meta(i), "p", 1)
    (sid,) = stable_series(db, 0.0)
    first = mark_judged(db, sid, queue=True, reason="", expected_count=3)
    rec.record(meta(3), "p", 1)
    second = mark_judged(db, sid, queue=True, reason="", expected_count=4)
    with db.session() as s:
        assert s.get(Job, first).state == "skipped" and s.get(Job, second).state == "queued"
    assert claim_job(db) == second and claim_job(db) is None


def test_job_keeps_its_own_image_count_and_the_series_follows_its_job(tmp_path):
    """`jobs` shows how many images a job segmented (not the series' count today), and a series whose job
    ended no longer says "queued"."""
    from dicom_node.watch.admin import job_rows

    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    for i in range(3):
        rec.record(meta(i), "p", 1)
    (sid,) = stable_series(db, 0.0)
    first = mark_judged(db, sid, queue=True, reason="", expected_count=3)
    assert claim_job(db, "w1") == first
    set_state(db, first, "done", event_detail="")
    with db.session() as s:
        assert s.get(Series, sid).state == "done"
    for i in range(3, 5):
        rec.record(meta(i), "p", 1)
    second = mark_judged(db, sid, queue=True, reason="", expected_count=5)
    rows = {r["job"]: r["instances"] for r in job_rows(db)}
    assert rows == {first: 3, second: 5}
    with db.session() as s:
        assert s.get(Series, sid).state == "queued"  # its newest job waits
