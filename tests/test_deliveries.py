"""The outbox's rules in the database, on SQLite and on a real PostgreSQL ($TEST_DATABASE_URL): row states,
a job done only when every destination has (and confirmed) its result, destinations down together and woken
together, give-up and re-queue without re-encoding, superseded results never sent, senders never sharing
a row, and a dead sender's row taken again at once."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading

import pytest
from sqlalchemy import select, update
from test_durability import db_url  # noqa: F401  (the SQLite / PostgreSQL fixture)

from storage import deliveries
from storage.db import Database
from storage.jobs import requeue
from storage.models import Event, Job, OutboxItem, Series, Study, utcnow

FILES = [{"path": "/results/job/SEG_binary.dcm", "sop_class": "1.2.840.10008.5.1.4.1.1.66.4", "sop_uid": "2.25.1"},
         {"path": "/results/job/SR_binary.dcm", "sop_class": "1.2.840.10008.5.1.4.1.1.88.34", "sop_uid": "2.25.2"}]


def _db(url: str) -> Database:
    db = Database(url)
    db.create_schema()
    return db


def _job(db: Database, n: int = 1) -> list[int]:
    """Jobs in 'running' (a worker just encoded their results), one series each."""
    ids = []
    with db.session() as s:
        st = Study(study_uid=f"2.25.{utcnow().timestamp():.0f}{len(ids)}")
        s.add(st)
        s.flush()
        for i in range(n):
            se = Series(series_uid=f"{st.study_uid}.{i}", study_id=st.id, modality="MR", state="queued")
            s.add(se)
            s.flush()
            job = Job(
                series_id=se.id, state="running", attempts=1, n_instances=24, seg_path="/results/job/SEG_binary.dcm"
            )
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def _state(db: Database, job_id: int) -> tuple[str, str]:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job.state, s.get(Series, job.series_id).state


def test_a_job_is_done_when_every_destination_has_and_confirmed_it(db_url):  # noqa: F811
    db = _db(db_url)
    (job,) = _job(db)
    deliveries.enqueue(db, job, {"pacs": FILES, "archive": FILES})
    assert _state(db, job) == ("delivering", "queued")
    (a,) = deliveries.claim(db, "pacs", "host:1:sender", 60, 10)
    assert deliveries.claim(db, "pacs", "host:2:sender", 60, 10) == []  # held by the first sender
    deliveries.mark_sent(db, a.id, utcnow(), "2 instances")
    assert _state(db, job)[0] == "delivering"  # the archive has not got it yet
    (b,) = deliveries.claim(db, "archive", "host:1:sender", 60, 10)
    deliveries.set_transaction(db, b.id, "2.25.77")
    deliveries.mark_sent(db, b.id, utcnow(), "2 instances", ("2.25.77", utcnow() + dt.timedelta(seconds=60)))
    assert _state(db, job)[0] == "delivering"  # sent, but the archive has not confirmed it
    # the archive lost the SR: that row is sent again (same files), then confirmed
    out = deliveries.record_commitment(db, "2.25.77", {"2.25.1"}, {"2.25.2": "0x0112 no such object instance"})
    assert "failed for 1 of 2 instances" in out
    (b2,) = deliveries.claim(db, "archive", "host:1:sender", 60, 10)
    assert b2.id == b.id and b2.files == FILES and b2.attempts == 2
    deliveries.set_transaction(db, b.id, "2.25.78")
    deliveries.mark_sent(db, b.id, utcnow(), "2 instances", ("2.25.78", utcnow() + dt.timedelta(seconds=60)))
    assert deliveries.record_commitment(db, "2.25.78", {"2.25.1", "2.25.2"}, {}) == f"delivery {b.id} committed"
    assert _state(db, job) == ("done", "done")  # the series no longer says "queued"
    assert deliveries.record_commitment(db, "2.25.999", set(), {}).startswith("unknown transaction")
    db.dispose()


def test_a_down_destination_holds_its_rows_together_and_its_first_success_wakes_them(db_url):  # noqa: F811
    db = _db(db_url)
    jobs = _job(db, 3)
    for j in jobs:
        deliveries.enqueue(db, j, {"pacs": FILES})
    claimed = deliveries.claim(db, "pacs", "host:1:sender", 60, 10)
    assert len(claimed) == 3  # everything due for one destination goes on one association
    waits = []
    for _ in range(5):
        t0 = utcnow()
        next_at = deliveries.destination_failed(db, "pacs", "connection refused by 127.0.0.1:1", 10, 40)
        waits.append(round((next_at - t0).total_seconds()))
    assert waits == [10, 20, 40, 40, 40]  # doubling, capped at retry_max_seconds
    for it in claimed:
        deliveries.mark_retry(db, it.id, utcnow(), "connection refused by 127.0.0.1:1", next_at)
    assert deliveries.destination_wait(db, "pacs") > 30
    assert deliveries.claim(db, "pacs", "host:1:sender", 60, 10) == []
    (summary,) = deliveries.destination_summary(db, ["pacs"])
    assert summary["up"] is False and summary["waiting"] == 3 and "refused" in summary["last_error"]
    alerted, down_since = deliveries.destination_ok(db, "pacs")
    assert alerted is False and down_since is not None  # no alert had gone out; it was down since then
    assert deliveries.destination_wait(db, "pacs") == 0
    assert len(deliveries.claim(db, "pacs", "host:1:sender", 60, 10)) == 3  # all due at once
    db.dispose()


def test_give_up_then_retry_sends_the_same_files_without_computing_again(db_url):  # noqa: F811
    db = _db(db_url)
    (job,) = _job(db)
    deliveries.enqueue(db, job, {"pacs": FILES})
    with db.session() as s:
        s.execute(
            update(OutboxItem).values(created_at=utcnow() - dt.timedelta(hours=25), last_error="connection refused")
        )
    ((_, j, reason),) = deliveries.give_up(db, "pacs", 24)
    assert j == job and "given up after 24 h" in reason and "connection refused" in reason
    assert _state(db, job) == ("failed", "failed")
    assert requeue(db, job_ids=[job]) == [job]  # dicom-node retry
    with db.session() as s:
        row = s.scalar(select(OutboxItem))
        assert (row.state, row.attempts, json.loads(row.files)) == ("pending", 0, FILES)
        assert s.get(Job, job).state == "delivering" and s.get(Job, job).attempts == 1  # not queued for compute
    assert deliveries.give_up(db, "pacs", 24) == []  # a new give-up clock
    db.dispose()


def test_a_superseded_result_is_cancelled_not_sent(db_url):  # noqa: F811
    db = _db(db_url)
    old, new = _job(db, 2)
    deliveries.enqueue(db, old, {"pacs": FILES})
    with db.session() as s:
        s.get(Job, old).superseded_by = new
    assert deliveries.cancel_superseded(db) == [old]
    assert deliveries.claim(db, "pacs", "host:1:sender", 60, 10) == []
    assert _state(db, old)[0] == "skipped"
    db.dispose()


def test_two_senders_never_take_the_same_row(db_url):  # noqa: F811
    db = _db(db_url)
    for j in _job(db, 40):
        deliveries.enqueue(db, j, {"pacs": FILES})
    got: dict[str, list[int]] = {"a": [], "b": []}

    def sender(name: str) -> None:
        while True:
            items = deliveries.claim(db, "pacs", f"host:{name}:sender", 60, 3)
            if not items:
                return
            got[name] += [it.id for it in items]

    threads = [threading.Thread(target=sender, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 40
    db.dispose()


def test_a_row_of_a_dead_sender_is_sent_again_at_once(db_url):  # noqa: F811
    db = _db(db_url)
    (job,) = _job(db)
    deliveries.enqueue(db, job, {"pacs": FILES})
    host = socket.gethostname()
    (it,) = deliveries.claim(db, "pacs", f"{host}:999999999:sender", 600, 10)  # no such process
    assert deliveries.claim(db, "pacs", f"{host}:1:sender", 600, 10) == []
    assert deliveries.release_dead_local_claims(db, host) == 1
    (again,) = deliveries.claim(db, "pacs", f"{host}:2:sender", 600, 10)
    assert again.id == it.id and again.files == FILES  # the same files, the same UIDs
    with db.session() as s:
        assert any(
            "stopped before the answer" in e.detail for e in s.scalars(select(Event).where(Event.kind == "retry"))
        )
    db.dispose()


@pytest.mark.parametrize("outcome", ["sent", "failed"])
def test_an_answer_racing_the_senders_bookkeeping_commits_once(db_url, outcome):  # noqa: F811
    """The archive's Storage Commitment answer reaches the listener (another thread, another session) just as
    the sender records its own outcome: the send succeeded ("sent"), or its N-ACTION answer was lost
    ("failed": the sender schedules a retry). Either way the row ends committed, with one "committed" on the
    timeline, and is never sent or asked for again. The answer is injected at the sender's first UPDATE of
    the row, i.e. after anything a read-then-write would have read: a sender that wrote what it read before
    would turn the row back into "sent" (asked again at the deadline) or "pending" (sent again), and commit
    it a second time."""
    from sqlalchemy import event

    db = _db(db_url)
    (job,) = _job(db)
    deliveries.enqueue(db, job, {"archive": FILES})
    (it,) = deliveries.claim(db, "archive", "host:1:sender", 60, 10)
    deliveries.set_transaction(db, it.id, "2.25.90")
    answered: list[str] = []
    fired = threading.Event()

    def answer_first(conn, cursor, statement, params, context, executemany):
        if not fired.is_set() and statement.lstrip().upper().startswith("UPDATE OUTBOX"):
            fired.set()  # once: the answer's own UPDATE passes through here too
            t = threading.Thread(target=lambda: answered.append(
                deliveries.record_commitment(db, "2.25.90", {"2.25.1", "2.25.2"}, {})))
            t.start()
            t.join(30)

    past = utcnow() - dt.timedelta(seconds=1)  # a row wrongly left open would be due again at once
    event.listen(db.engine, "before_cursor_execute", answer_first)
    try:
        if outcome == "sent":
            deliveries.mark_sent(db, it.id, utcnow(), "2 instances", ("2.25.90", past))
        else:
            deliveries.mark_retry(db, it.id, utcnow(), "no N-ACTION response (timeout or abort)", past)
    finally:
        event.remove(db.engine, "before_cursor_execute", answer_first)
    assert answered == [f"delivery {it.id} committed"]
    with db.session() as s:
        row = s.get(OutboxItem, it.id)
        assert (row.state, row.commit_deadline) == ("committed", None)
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.job_id == job).order_by(Event.id))]
    assert kinds.count("committed") == 1 and "retry" not in kinds, kinds
    assert deliveries.claim(db, "archive", "host:1:sender", 60, 10) == []
    assert _state(db, job) == ("done", "done")
    # a second copy of the same answer changes nothing
    assert "already committed" in deliveries.record_commitment(db, "2.25.90", {"2.25.1", "2.25.2"}, {})
    db.dispose()
