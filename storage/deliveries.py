"""The outbox in the database: one row per (job, destination), the destinations' up/down state, and every
state change of a delivery (each try also logged in ``deliveries`` and on the timeline).

Why a table and not a retry loop in the job: a PACS down for hours must hold neither a worker nor the
job's attempts; rows wait with ``next_attempt_at`` and any sender process (``serve`` or ``dicom-node
sender``) takes them with row locks, so a crash or restart loses nothing and sends nothing twice on purpose.

States (``OutboxState``): pending → sending → sent → committed, or failed / cancelled. A row SENT to
a destination with Storage Commitment waits (``commit_deadline``) for the archive's N-EVENT-REPORT.
A job is ``delivering`` while any of its rows is open and becomes ``done`` (or ``failed``) with the last.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update

from .db import Database
from .models import Delivery, DestinationState, Job, OutboxItem, Series, utcnow
from .rows import get_row
from .states import EventKind, JobState, OutboxState, SeriesState
from .timeline import add_event

OPEN = (OutboxState.PENDING, OutboxState.SENDING, OutboxState.SENT)


@dataclass
class Claimed:
    """A row a sender holds: what to send where, and what it was before (a re-commit, or a first send)."""

    id: int
    job_id: int
    series_id: int
    destination: str
    files: list[dict]
    attempts: int
    commit_requests: int


def backoff(initial: float, maximum: float, n: int) -> float:
    """Seconds before try ``n + 1`` after ``n`` failures: initial, doubling, capped at maximum."""
    return min(maximum, initial * 2 ** max(0, n - 1))


def _done(row: OutboxItem) -> bool:
    """Delivered for good: committed, or sent to a destination that does not confirm (no deadline)."""
    return row.state == OutboxState.COMMITTED or (row.state == OutboxState.SENT and row.commit_deadline is None)


# ------------------------------------------------------------------------------------------ enqueue
def enqueue(db: Database, job_id: int, per_destination: dict[str, list[dict]]) -> list[int]:
    """Put one job's result in the outbox for each destination (not again for one that has an open or
    finished row: a re-run after a crash only goes on with what is there); the job becomes ``delivering``."""
    now = utcnow()
    with db.session() as s:
        job = get_row(s, Job, job_id)
        have = set(s.scalars(select(OutboxItem.destination).where(
            OutboxItem.job_id == job_id, OutboxItem.state != OutboxState.FAILED)))
        ids = []
        for dest, files in per_destination.items():
            if dest in have:
                continue
            row = OutboxItem(job_id=job_id, destination=dest, state=OutboxState.PENDING, files=json.dumps(files),
                             created_at=now, next_attempt_at=now)
            s.add(row)
            s.flush()
            ids.append(row.id)
        job.state, job.lease_owner = JobState.DELIVERING, ""
        add_event(s, EventKind.DELIVERING, series_id=job.series_id, job_id=job_id,
                  detail=", ".join(per_destination) or "no destination configured")
        _finish_job(s, job_id)
        return ids


# ------------------------------------------------------------------------------------------ claiming
def cancel_superseded(db: Database) -> list[int]:
    """Rows not yet sent whose job was superseded (later instances made a newer result): cancelled, never
    sent. Returns the jobs touched."""
    now = utcnow()
    with db.session() as s:
        rows = s.execute(select(OutboxItem).join(Job, Job.id == OutboxItem.job_id).where(
            OutboxItem.state == OutboxState.PENDING, Job.superseded_by.is_not(None))).scalars().all()
        jobs = set()
        for row in rows:
            row.state, row.finished_at = OutboxState.CANCELLED, now
            newer = get_row(s, Job, row.job_id).superseded_by
            row.last_error = f"superseded by job {newer} (later instances arrived); not sent"
            add_event(s, EventKind.CANCELLED, series_id=get_row(s, Job, row.job_id).series_id, job_id=row.job_id,
                      detail=f"delivery to {row.destination}: {row.last_error}")
            jobs.add(row.job_id)
        for jid in jobs:
            _finish_job(s, jid)
        return sorted(jobs)


def claim(db: Database, destination: str, owner: str, claim_seconds: float, limit: int) -> list[Claimed]:
    """Take every due row of one destination (up to ``limit``), oldest job first, for one association.

    Due: pending and past ``next_attempt_at``; sending with an expired claim (its sender died between
    sending and the answer: sent again, same files, same UIDs); sent with a Storage Commitment answer
    overdue (sent again and committed again). PostgreSQL locks the rows ``FOR UPDATE SKIP LOCKED``, so two
    senders never take the same row; SQLite's single writer serialises the update.
    """
    now = utcnow()
    due = ((OutboxItem.state == OutboxState.PENDING) & (OutboxItem.next_attempt_at <= now)) \
        | ((OutboxItem.state == OutboxState.SENDING) & (OutboxItem.claim_expires_at < now)) \
        | ((OutboxItem.state == OutboxState.SENT) & OutboxItem.commit_deadline.is_not(None)
           & (OutboxItem.commit_deadline < now))
    q = select(OutboxItem).where(OutboxItem.destination == destination, due) \
        .order_by(OutboxItem.job_id, OutboxItem.id).limit(limit)
    if db.engine.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    out = []
    with db.session() as s:
        for row in s.scalars(q).all():
            before = row.state
            # compare-and-set: on SQLite the SELECT above holds no lock, so a second sender may have taken the
            # row in between; only the one whose update matches the state it read gets it
            if not _compare_and_set(s, row.id, (before,), {
                    "state": OutboxState.SENDING, "claimed_by": owner,
                    "claim_expires_at": now + dt.timedelta(seconds=claim_seconds),
                    "attempts": OutboxItem.attempts + 1}, OutboxItem.attempts == row.attempts):
                continue
            series_id = _series(s, row.job_id)
            if before == OutboxState.SENDING:
                add_event(s, EventKind.RETRY, series_id=series_id, job_id=row.job_id,
                          detail=f"delivery to {destination}: its sender {row.claimed_by} stopped before the "
                                 "answer; sending the same files again")
            elif before == OutboxState.SENT:
                add_event(s, EventKind.RETRY, series_id=series_id, job_id=row.job_id,
                          detail=f"delivery to {destination}: no Storage Commitment answer by "
                                 f"{row.commit_deadline:%H:%M:%S}; sending again and asking again")
            out.append(Claimed(row.id, row.job_id, series_id, row.destination, json.loads(row.files),
                               row.attempts + 1, row.commit_requests))
    return out


def release_dead_local_claims(db: Database, host: str) -> int:
    """Rows held by a sender on this host that no longer exists (killed between sending and the answer):
    due again now, rather than after ``sender.claim_seconds``. Owners look like host:pid:role."""
    import os

    now = utcnow()
    n = 0
    with db.session() as s:
        for row in s.scalars(select(OutboxItem).where(OutboxItem.state == OutboxState.SENDING,
                                                      OutboxItem.claimed_by.like(f"{host}:%"))):
            try:
                os.kill(int(row.claimed_by.split(":")[1]), 0)
                continue  # still alive
            except ProcessLookupError:
                pass
            except (ValueError, IndexError, PermissionError):
                continue
            row.claim_expires_at = now - dt.timedelta(seconds=1)
            n += 1
    return n


def overdue_commitments(db: Database, destination: str, max_requests: int) -> list[tuple[int, int, str]]:
    """Rows whose archive never answered ``max_requests`` commitment requests: failed (flagged for an
    admin) instead of asked forever. Returns (row, job, reason)."""
    now = utcnow()
    out = []
    with db.session() as s:
        rows = s.scalars(select(OutboxItem).where(
            OutboxItem.destination == destination, OutboxItem.state == OutboxState.SENT,
            OutboxItem.commit_deadline < now, OutboxItem.commit_requests >= max_requests)).all()
        for row in rows:
            reason = (f"no Storage Commitment answer from {destination} after {row.commit_requests} requests "
                      "(the instances were sent; the archive never confirmed holding them)")
            _fail(s, row, reason, now)
            out.append((row.id, row.job_id, reason))
    return out


def give_up(db: Database, destination: str, hours: float) -> list[tuple[int, int, str]]:
    """Rows still open ``hours`` after they were queued (or re-queued): failed, the dead letter."""
    now = utcnow()
    cutoff = now - dt.timedelta(hours=hours)
    out = []
    with db.session() as s:
        rows = s.scalars(select(OutboxItem).where(
            OutboxItem.destination == destination, OutboxItem.state.in_((OutboxState.PENDING, OutboxState.SENT)),
            OutboxItem.created_at < cutoff)).all()
        for row in rows:
            if _done(row):
                continue
            reason = (f"given up after {hours:g} h (give_up_after_hours) and {row.attempts} tries; last error: "
                      f"{row.last_error or 'none recorded'}")
            _fail(s, row, reason, now)
            out.append((row.id, row.job_id, reason))
    return out


# ------------------------------------------------------------------------------------------ outcomes
def _series(s, job_id: int) -> int:
    return s.scalar(select(Job.series_id).where(Job.id == job_id))


def _log(s, row: OutboxItem, ok: bool, status: str, error: str, started: dt.datetime) -> None:
    s.add(Delivery(job_id=row.job_id, destination=row.destination, attempt=row.attempts, ok=ok, status=status,
                   error=error[:4000], started_at=started, finished_at=utcnow()))


def mark_sent(db: Database, item_id: int, started: dt.datetime, detail: str,
              commitment: tuple[str, dt.datetime] | None = None) -> str | None:
    """The destination stored every file. With Storage Commitment, the row waits for the archive's answer
    under ``transaction_uid`` until ``commit_deadline``. Returns the job's state if this finished it.

    The archive's answer can arrive on the node's listener while this runs (another thread, another
    session): the change is a compare-and-set from ``sending``, so an answer recorded first is never turned
    back into ``sent`` (which would ask for commitment again when the deadline passed, and commit twice)."""
    now = utcnow()
    values: dict = {"sent_at": now, "claimed_by": "", "claim_expires_at": None, "last_error": "",
                    "state": OutboxState.SENT}
    asked = ""
    if commitment:
        values.update(transaction_uid=commitment[0], commit_deadline=commitment[1],
                      commit_requests=OutboxItem.commit_requests + 1)
        asked = f"; Storage Commitment requested (transaction {commitment[0]})"
    else:
        values.update(commit_deadline=None, finished_at=now)
    with db.session() as s:
        took = _compare_and_set(s, item_id, (OutboxState.SENDING,), values)
        row = get_row(s, OutboxItem, item_id, populate_existing=True)
        if not took:
            if row is not None and row.state == OutboxState.COMMITTED:  # the answer arrived on our listener first
                _log(s, row, True, OutboxState.SENT, "", started)
                add_event(s, EventKind.SENT, series_id=_series(s, row.job_id), job_id=row.job_id,
                          detail=f"to {row.destination}, attempt {row.attempts}: {detail}; already committed")
            return None  # committed already, or an admin got here first
        job = get_row(s, Job, row.job_id)
        timings = json.loads(job.timings or "{}")  # the "send" stage: time on the wire, every destination
        timings["send"] = round(timings.get("send", 0.0) + (now - started).total_seconds(), 4)
        job.timings = json.dumps(timings)
        _log(s, row, True, OutboxState.SENT, "", started)
        add_event(s, EventKind.SENT, series_id=_series(s, row.job_id), job_id=row.job_id,
                  detail=f"to {row.destination}, attempt {row.attempts}: {detail}{asked}")
        return _finish_job(s, row.job_id)


def _compare_and_set(s, item_id: int, states: tuple[str, ...], values: dict, *also) -> bool:
    """Move one row only if it is still in one of ``states`` (and meets ``also``, further conditions).

    Why not read-then-write: the SELECT holds no lock on SQLite (and none under PostgreSQL's READ
    COMMITTED), so two senders, or a sender and a Storage Commitment answer on the listener, could both
    read the same state and both write; the UPDATE's own WHERE decides which one wins. The session's copy
    of the row is left as it was read (callers that need the written row get it again)."""
    return s.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state.in_(states), *also)
                     .values(**values).execution_options(synchronize_session=False)).rowcount == 1


def set_transaction(db: Database, item_id: int, transaction_uid: str) -> None:
    """Remember the commitment transaction before asking, so that an answer arriving at once is matched."""
    with db.session() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(transaction_uid=transaction_uid))


def mark_retry(db: Database, item_id: int, started: dt.datetime, error: str, next_at: dt.datetime) -> None:
    """This try failed: the row waits until ``next_at`` (its own clock, or its destination's). A
    compare-and-set from ``sending``, like :func:`mark_sent`: an archive that committed the instances although
    its N-ACTION answer was lost has its answer kept, not overwritten."""
    with db.session() as s:
        if not _compare_and_set(s, item_id, (OutboxState.SENDING,), {
                "state": OutboxState.PENDING, "next_attempt_at": next_at, "last_error": error[:4000], "claimed_by": "",
                "claim_expires_at": None}):
            return
        row = get_row(s, OutboxItem, item_id, populate_existing=True)
        _log(s, row, False, OutboxState.FAILED, error, started)
        wait = max(0.0, (next_at - utcnow()).total_seconds())
        add_event(s, EventKind.RETRY, series_id=_series(s, row.job_id), job_id=row.job_id,
                  detail=f"delivery to {row.destination}, attempt {row.attempts}: {error}; next try in {wait:.0f} s")


def _fail(s, row: OutboxItem, reason: str, now: dt.datetime) -> None:
    row.state, row.finished_at, row.last_error, row.claimed_by = OutboxState.FAILED, now, reason[:4000], ""
    add_event(s, EventKind.FAILED, series_id=_series(s, row.job_id), job_id=row.job_id,
              detail=f"delivery to {row.destination}: {reason}")
    _finish_job(s, row.job_id)


def _finish_job(s, job_id: int) -> str | None:
    """Close the job when its last delivery closed: done (every row delivered), failed (a row given up),
    skipped (superseded before anything was sent). The series follows its job."""
    s.flush()
    job = s.get(Job, job_id)
    if job.state not in (JobState.DELIVERING, JobState.SENDING):
        return None
    rows = s.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id)).all()
    if any(r.state in OPEN and not _done(r) for r in rows):
        return None
    now = utcnow()
    failed = [r for r in rows if r.state == OutboxState.FAILED]
    if failed:
        job.state, job.reason = JobState.FAILED, "; ".join(f"{r.destination}: {r.last_error}" for r in failed)[:4000]
    elif rows and all(r.state == OutboxState.CANCELLED for r in rows):
        job.state = JobState.SKIPPED
        job.reason = f"superseded by job {job.superseded_by} (later instances arrived); not sent"
    else:
        job.state, job.reason = JobState.DONE, ""
    job.finished_at, job.lease_owner = now, ""
    if job.state != JobState.SKIPPED:
        done = job.state == JobState.DONE
        add_event(s, EventKind.DELIVERED if done else EventKind.FAILED, series_id=job.series_id, job_id=job_id,
                  detail=", ".join(f"{r.destination} {r.state}" for r in rows) if done else job.reason)
    series = s.get(Series, job.series_id)
    newest = s.scalar(select(func.max(Job.id)).where(Job.series_id == job.series_id))
    if series.state == SeriesState.QUEUED and newest == job_id:
        series.state = job.state  # the series' own state no longer says QUEUED once its job is over
    return job.state


# ------------------------------------------------------------------------------------------ commitment
def record_commitment(db: Database, transaction_uid: str, committed: set[str], failed: dict[str, str]) -> str:
    """The archive's N-EVENT-REPORT for a transaction: ``committed`` when it confirms every instance the row
    sent; failed references make the row pending again (the same files are sent again and committed
    again). Returns what was done, in words (for the log). A second answer for the same transaction (or
    one racing the sender's own bookkeeping) changes nothing: the move is a compare-and-set."""
    now = utcnow()
    with db.session() as s:
        row = s.scalar(select(OutboxItem).where(OutboxItem.transaction_uid == transaction_uid))
        if row is None:
            return f"unknown transaction {transaction_uid}: ignored"
        row_id, job_id, destination = row.id, row.job_id, row.destination
        uids = {f["sop_uid"] for f in json.loads(row.files)}
        missing = uids - committed
        if not missing:
            values = {"state": OutboxState.COMMITTED, "committed_at": now, "finished_at": now, "commit_deadline": None,
                      "claimed_by": ""}
        else:
            reasons = "; ".join(f"{u}: {failed.get(u, 'not in the answer')}" for u in sorted(missing))
            error = f"Storage Commitment failed for {len(missing)} of {len(uids)} instances ({reasons})"[:4000]
            values = {"state": OutboxState.PENDING, "next_attempt_at": now, "commit_deadline": None, "claimed_by": "",
                      "last_error": error}
        if not _compare_and_set(s, row_id, (OutboxState.SENT, OutboxState.SENDING), values,
                                OutboxItem.transaction_uid == transaction_uid):
            state = get_row(s, OutboxItem, row_id, populate_existing=True).state
            return f"transaction {transaction_uid} of delivery {row_id} already {state}"
        s.get(OutboxItem, row_id, populate_existing=True)  # the session's copy as written, for _finish_job
        series_id = _series(s, job_id)
        if not missing:
            add_event(s, EventKind.COMMITTED, series_id=series_id, job_id=job_id,
                      detail=f"{destination} confirmed all {len(uids)} instances (Storage Commitment)")
            _finish_job(s, job_id)
            return f"delivery {row_id} committed"
        add_event(s, EventKind.RETRY, series_id=series_id, job_id=job_id,
                  detail=f"delivery to {destination}: {values['last_error']}; sending again")
        return f"delivery {row_id}: {values['last_error']}"


# ------------------------------------------------------------------------------------------ destinations
def _dest(s, name: str) -> DestinationState:
    d = s.get(DestinationState, name)
    if d is None:
        d = DestinationState(name=name, up=True, since=utcnow(), failures=0, last_error="", down_notified=False)
        s.add(d)
        s.flush()
    return d


def destination_wait(db: Database, name: str) -> float:
    """Seconds until a destination may be tried again (0: now). While it is down every row waits for it."""
    with db.session() as s:
        d = _dest(s, name)
        if d.up or d.next_attempt_at is None:
            return 0.0
        return max(0.0, (d.next_attempt_at - utcnow()).total_seconds())


def destination_failed(db: Database, name: str, error: str, initial: float, maximum: float) -> dt.datetime:
    """A connection-level failure (refused, timeout, rejected, aborted): the destination is down; returns
    when it (and every row waiting for it) is tried next."""
    now = utcnow()
    with db.session() as s:
        d = _dest(s, name)
        if d.up:
            d.up, d.since, d.down_notified = False, now, False
        d.failures += 1
        d.last_error = error[:4000]
        d.next_attempt_at = now + dt.timedelta(seconds=backoff(initial, maximum, d.failures))
        return d.next_attempt_at


def destination_ok(db: Database, name: str) -> tuple[bool, dt.datetime | None]:
    """The destination answered: up again, and every row waiting for it is due now (the first success wakes
    them all). Returns (whether a down alert had gone out, since when it was down)."""
    now = utcnow()
    with db.session() as s:
        d = _dest(s, name)
        was_alerted, down_since = d.down_notified, (None if d.up else d.since)
        if not d.up:
            d.up, d.since = True, now
        d.failures, d.next_attempt_at, d.last_ok_at, d.down_notified = 0, None, now, False
        s.execute(update(OutboxItem).where(OutboxItem.destination == name, OutboxItem.state == OutboxState.PENDING,
                                           OutboxItem.next_attempt_at > now).values(next_attempt_at=now))
        return was_alerted, down_since


def destinations_to_alert(db: Database, minutes: float) -> list[dict]:
    """Destinations down for longer than ``minutes`` whose alert has not gone out yet (each is marked)."""
    cutoff = utcnow() - dt.timedelta(minutes=minutes)
    with db.session() as s:
        out = []
        for d in s.scalars(select(DestinationState).where(DestinationState.up.is_(False),
                                                          DestinationState.down_notified.is_(False),
                                                          DestinationState.since <= cutoff)):
            d.down_notified = True
            out.append({"destination": d.name, "down_since": d.since.isoformat(timespec="seconds") + "Z",
                        "last_error": d.last_error})
        return out


def destination_summary(db: Database, names: list[str], probe_seconds: dict[str, float] | None = None) -> list[dict]:
    """Per destination: up or down since when, deliveries waiting, the oldest waiting one's age, last error.

    ``next_try`` is the backoff clock of a down destination's deliveries; the sender probes it apart from that
    clock (``probe_seconds``, deliver/probe.py) and sends as soon as a probe is answered, so a down destination
    also reports ``probe_every_s``: without it an admin reads a retry minutes away as the wait for a PACS
    that is back."""
    now = utcnow()
    with db.session() as s:
        out = []
        # rows still owed to their destination (a row sent where no Storage Commitment is awaited is delivered)
        owed = (OutboxItem.state.in_(OPEN),
                or_(OutboxItem.state != OutboxState.SENT, OutboxItem.commit_deadline.is_not(None)))
        waiting = dict(s.execute(select(OutboxItem.destination, func.count()).where(*owed)
                                 .group_by(OutboxItem.destination)).all())
        oldest = dict(s.execute(select(OutboxItem.destination, func.min(OutboxItem.created_at)).where(*owed)
                                .group_by(OutboxItem.destination)).all())
        failed = dict(s.execute(select(OutboxItem.destination, func.count())
                                .where(OutboxItem.state == OutboxState.FAILED)
                                .group_by(OutboxItem.destination)).all())
        states = {d.name: d for d in s.scalars(select(DestinationState))}
        for name in list(names) + sorted(set(states) - set(names)):
            d = states.get(name)
            o = oldest.get(name)
            out.append({"destination": name, "up": d.up if d else True,
                        "since": d.since.isoformat(timespec="seconds") + "Z" if d else None,
                        "last_error": d.last_error if d else "", "failures": d.failures if d else 0,
                        "next_try": d.next_attempt_at.isoformat(timespec="seconds") + "Z"
                        if d and not d.up and d.next_attempt_at else None,
                        "probe_every_s": (probe_seconds or {}).get(name) if d and not d.up else None,
                        "waiting": waiting.get(name, 0), "failed": failed.get(name, 0),
                        "oldest_waiting_s": round((now - o).total_seconds(), 1) if o else 0.0,
                        "configured": name in names})
        return out


# ------------------------------------------------------------------------------------------ admin
def list_items(db: Database, state: str | None = None, destination: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[dict]:
    with db.session() as s:
        q = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
        if state:
            q = q.where(OutboxItem.state == state)
        if destination:
            q = q.where(OutboxItem.destination == destination)
        if job_id is not None:
            q = q.where(OutboxItem.job_id == job_id)
        iso = lambda t: t.isoformat(timespec="seconds") + "Z" if t else None  # noqa: E731
        return [{"id": r.id, "job": r.job_id, "destination": r.destination, "state": r.state,
                 "attempts": r.attempts, "instances": [f["sop_uid"] for f in json.loads(r.files)],
                 "created": iso(r.created_at),
                 "next_try": iso(r.next_attempt_at) if r.state == OutboxState.PENDING else None,
                 "sent": iso(r.sent_at), "committed": iso(r.committed_at), "transaction_uid": r.transaction_uid,
                 "error": r.last_error} for r in s.scalars(q)]


def requeue(db: Database, ids: list[int] | None = None, job_ids: list[int] | None = None,
            failed_only: bool = True) -> list[int]:
    """Send failed (or, with ``failed_only=False``, any not yet finished) deliveries again, now, with a new
    give-up clock; their jobs go back to ``delivering``. Nothing is re-encoded: the same files, same UIDs."""
    now = utcnow()
    with db.session() as s:
        q = select(OutboxItem)
        if ids is not None:
            q = q.where(OutboxItem.id.in_(ids))
        if job_ids is not None:
            q = q.where(OutboxItem.job_id.in_(job_ids))
        q = q.where(OutboxItem.state == OutboxState.FAILED if failed_only else OutboxItem.state != OutboxState.SENDING)
        out = []
        for row in s.scalars(q).all():
            row.state, row.attempts, row.commit_requests, row.next_attempt_at = OutboxState.PENDING, 0, 0, now
            row.created_at, row.finished_at, row.commit_deadline, row.claimed_by = now, None, None, ""
            job = get_row(s, Job, row.job_id)
            if job.state in (JobState.FAILED, JobState.DONE):
                job.state, job.finished_at, job.reason = JobState.DELIVERING, None, ""
            add_event(s, EventKind.REQUEUED, series_id=job.series_id, job_id=job.id,
                      detail=f"delivery to {row.destination} by an admin")
            out.append(row.id)
        return out

