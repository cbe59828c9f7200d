"""The job queue: a judged series becomes a job, workers claim it under a lease and renew it, and it ends
done, failed (after retries), skipped or requeued by an admin; plus the counts the dashboard shows.

Why one module: every move of a job's state goes through these few compare-and-set updates, so two workers,
a worker and an admin, or a late instance and a claim never both win. The quality gate's hold and review
(``storage.review``) and the outbox (``storage.deliveries``) take the job over from here.
"""

from __future__ import annotations

import datetime as dt
import json
import os

from sqlalchemy import func, select, update

from . import deliveries
from .db import Database
from .models import Instance, Job, OutboxItem, Series, StructureVolume, Study, utcnow
from .rows import get_row, rowcount
from .states import AuditOutcome, EventKind, JobState, OutboxState, SeriesState
from .timeline import add_audit, add_event

#: states in which a worker holds the job's lease (``sending``: jobs from before the outbox)
LEASED = (JobState.RUNNING, JobState.SENDING)
#: end states of a job that its series takes over when it is the series' newest job
_SERIES_FOLLOWS = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)


def mark_judged(db: Database, series_id: int, *, queue: bool, reason: str, rule: str = "", urgent: bool = False,
                expected_count: int | None = None, how: str = "") -> int | None:
    """Close a complete series: create a queued job, or a skipped one carrying the reason; ``how`` says on
    the timeline what made it complete (the PACS's count, the images' own count, the quiet timer).

    ``expected_count`` guards against an instance that arrived while the rules were evaluated: if the count
    changed, nothing is decided now and the series stays open. A job that already produced (or is producing)
    a result for this series is marked superseded by the new one.
    """
    now = utcnow()
    with db.session() as s:
        q = update(Series).where(Series.id == series_id, Series.state == SeriesState.RECEIVING)
        if expected_count is not None:
            q = q.where(Series.n_instances == expected_count)
        res = s.execute(q.values(state=SeriesState.QUEUED if queue else SeriesState.SKIPPED, completed_at=now))
        if rowcount(res) != 1:
            return None
        _withdraw_queued(s, series_id, now)
        job = Job(series_id=series_id, state=JobState.QUEUED if queue else JobState.SKIPPED,
                  reason="" if queue else reason,
                  rule=rule, urgent=urgent, created_at=now, finished_at=None if queue else now,
                  n_instances=expected_count)
        s.add(job)
        s.flush()
        detail = "; ".join(x for x in (f"{expected_count} instances" if expected_count else "", how) if x)
        add_event(s, EventKind.COMPLETE, series_id=series_id, job_id=job.id, detail=detail, at=now)
        add_event(s, EventKind.QUEUED if queue else EventKind.SKIPPED, series_id=series_id, job_id=job.id,
                  detail=" ".join(x for x in ("urgent" if urgent else "", reason) if x) if queue else reason, at=now)
        if queue:
            older = s.scalars(select(Job).where(Job.series_id == series_id, Job.id != job.id,
                                                Job.superseded_by.is_(None),
                                                Job.state.in_(JobState.superseding()))).all()
            for old in older:
                old.superseded_by = job.id
                add_event(s, EventKind.SUPERSEDED, series_id=series_id, job_id=old.id,
                          detail=f"later instances arrived; job {job.id} makes a new result")
        return job.id


WITHDRAWN = "superseded: more instances arrived before it started"


def _withdraw_queued(s, series_id: int, now: dt.datetime, job_id: int | None = None) -> None:
    """Jobs still queued for a series that received more instances: they would segment an old, incomplete
    set of slices; skipped with the reason (the series' next completion makes a new job)."""
    q = select(Job.id).where(Job.series_id == series_id, Job.state == JobState.QUEUED)
    if job_id is not None:
        q = q.where(Job.id == job_id)
    for jid in s.scalars(q).all():
        res = s.execute(update(Job).where(Job.id == jid, Job.state == JobState.QUEUED).values(
            state=JobState.SKIPPED, reason=WITHDRAWN, finished_at=now))
        if rowcount(res):
            add_event(s, EventKind.SKIPPED, series_id=series_id, job_id=jid, detail=WITHDRAWN, at=now)


def claim_job(db: Database, owner: str = "", lease_seconds: float = 60.0, max_attempts: int = 3) -> int | None:
    """Take the next due job atomically: urgent first, then oldest; None when nothing is due.

    Due means queued (and past its backoff), or running/sending with an expired lease (its worker died).
    On PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so concurrent workers never
    wait for or take the same job; on SQLite the single writer serialises the compare-and-set update.
    """
    now = utcnow()
    due = ((Job.state == JobState.QUEUED) & (Job.next_attempt_at.is_(None) | (Job.next_attempt_at <= now))) | (
        Job.state.in_(LEASED) & (Job.lease_expires_at < now))
    q = select(Job.id, Job.state, Job.attempts, Job.series_id, Series.state).join(Series, Series.id == Job.series_id) \
        .where(due).order_by(Job.urgent.desc(), Job.created_at, Job.id).limit(1)
    if db.engine.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Job)
    for _ in range(20):
        with db.session() as s:
            row = s.execute(q).first()
            if row is None:
                return None
            jid, state, attempts, series_id, series_state = row
            # stamped now, after the row was read: ``now`` above may predate the commit that queued this job, and
            # its timeline would show it running before it was complete and queued
            now = max(now, utcnow())
            # more instances came after it was queued
            if state == JobState.QUEUED and series_state == SeriesState.RECEIVING:
                _withdraw_queued(s, series_id, now, jid)
                continue
            if state != JobState.QUEUED and attempts >= max_attempts:
                s.execute(update(Job).where(Job.id == jid, Job.state == state).values(
                    state=JobState.FAILED, finished_at=now, lease_owner="",
                    reason=f"dead-lettered: its worker stopped during {attempts} attempts (lease expired)"))
                add_event(s, EventKind.FAILED, series_id=series_id, job_id=jid,
                          detail="lease expired; attempts used up")
                continue
            res = s.execute(update(Job).where(Job.id == jid, Job.state == state).values(
                state=JobState.RUNNING, started_at=now, attempts=Job.attempts + 1, lease_owner=owner,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds), heartbeat_at=now))
            if rowcount(res) == 1:
                detail = f"attempt {attempts + 1} by {owner}" + (
                    "" if state == JobState.QUEUED else " (previous worker's lease expired)")
                add_event(s, EventKind.RUNNING, series_id=series_id, job_id=jid, detail=detail, at=now)
                return jid
    return None


def heartbeat(db: Database, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False if the job is no longer ours (lease expired and taken, or finished)."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.state.in_(LEASED)).values(
            heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))
        return rowcount(res) == 1


def superseded_by(db: Database, job_id: int) -> int | None:
    with db.session() as s:
        return s.scalar(select(Job.superseded_by).where(Job.id == job_id))


def set_state(db: Database, job_id: int, state: str, event_detail: str | None = None, **values) -> None:
    """Change a job's state; ``event_detail`` (even empty) also records it on the timeline."""
    if state in _SERIES_FOLLOWS:
        values.setdefault("lease_owner", "")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state, **values))
        if state in _SERIES_FOLLOWS:
            _series_follows(s, job_id, state)
        if event_detail is not None:
            kind = EventKind.DELIVERED if state == JobState.DONE else state
            add_event(s, kind, series_id=get_row(s, Job, job_id).series_id, job_id=job_id, detail=event_detail)


def _series_follows(s, job_id: int, state: str) -> None:
    """A series whose newest job ended takes the job's end state (it would otherwise say QUEUED forever)."""
    series_id = s.scalar(select(Job.series_id).where(Job.id == job_id))
    newest = s.scalar(select(func.max(Job.id)).where(Job.series_id == series_id))
    if newest == job_id:
        s.execute(update(Series).where(Series.id == series_id, Series.state == SeriesState.QUEUED).values(state=state))


def add_timing(db: Database, job_id: int, stage: str, seconds: float) -> None:
    with db.session() as s:
        job = get_row(s, Job, job_id)
        t = json.loads(job.timings or "{}")
        t[stage] = round(seconds, 4)
        job.timings = json.dumps(t)


def save_volumes(db: Database, job_id: int, volumes: dict[str, tuple[str, float]]) -> None:
    with db.session() as s:
        for name, (code, cm3) in volumes.items():
            s.add(StructureVolume(job_id=job_id, structure=name, snomed_code=code, volume_cm3=cm3))


def fail_or_retry(db: Database, job_id: int, error: str, max_attempts: int, backoff_seconds: float = 30.0) -> str:
    """After an error: back to the queue with exponential backoff, or failed (dead letter) when attempts are used up."""
    with db.session() as s:
        job = get_row(s, Job, job_id)
        job.lease_owner = ""
        if job.attempts < max_attempts:
            job.state = JobState.QUEUED
            wait = backoff_seconds * 2 ** (job.attempts - 1)
            job.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
            add_event(s, EventKind.RETRY, series_id=job.series_id, job_id=job_id,
                      detail=f"in {wait:.0f} s after: {error}")
        else:
            job.state = JobState.FAILED
            job.finished_at = utcnow()
            _series_follows(s, job_id, JobState.FAILED)
            add_event(s, EventKind.FAILED, series_id=job.series_id, job_id=job_id,
                      detail=f"after {job.attempts} attempts: {error}")
        job.reason = error[:4000]
        return job.state


def requeue(db: Database, job_ids: list[int] | None = None, failed: bool = False, actor: str = "",
            address: str = "", action: str = "retry") -> list[int]:
    """Put jobs back in the queue by hand (``dicom-node retry`` / ``requeue --failed``, the dashboard's retry),
    attempts reset. Each job asked for gets an audit row (who, from where, what, how it ended) and a timeline
    event naming who did it, in the same transaction as the change.

    A job whose result exists and only its delivery failed is not computed again: its failed deliveries go
    back to the outbox (same files, same UIDs) and the job to ``delivering``."""
    who = f"by {actor or 'an admin'}" + (f" from {address}" if address else "")
    with db.session() as s:
        q = select(Job)
        if job_ids is not None:
            q = q.where(Job.id.in_(job_ids))
        if failed:
            q = q.where(Job.state == JobState.FAILED)
        jobs = s.scalars(q).all()
        redeliver = []
        for job in jobs:
            if job.state in (JobState.RUNNING, JobState.SENDING, JobState.DELIVERING):
                add_audit(s, actor, address, action, job.id, AuditOutcome.REFUSED, f"job is {job.state}")
                add_event(s, EventKind.refused(action), series_id=job.series_id, job_id=job.id,
                          detail=f"{who}: job is {job.state}")
                continue
            has_failed_delivery = s.scalar(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.job_id == job.id, OutboxItem.state == OutboxState.FAILED))
            if job.state == JobState.FAILED and has_failed_delivery:
                redeliver.append(job.id)
                add_audit(s, actor, address, action, job.id, AuditOutcome.DONE, "failed delivery → outbox again")
                add_event(s, EventKind.REDELIVER, series_id=job.series_id, job_id=job.id, detail=who)
                continue
            before = job.state
            job.state, job.attempts, job.next_attempt_at = JobState.QUEUED, 0, None
            job.finished_at, job.lease_owner = None, ""
            add_audit(s, actor, address, action, job.id, AuditOutcome.DONE, f"{before} → queued")
            add_event(s, EventKind.REQUEUED, series_id=job.series_id, job_id=job.id, detail=who)
        found = {j.id for j in jobs}
        for missing in sorted(set(job_ids or []) - found):
            add_audit(s, actor, address, action, None, AuditOutcome.REFUSED,
                      f"job {missing}: no such job" + (" in state failed" if failed else ""))
        queued = [j.id for j in jobs if j.state == JobState.QUEUED]
    if redeliver:
        deliveries.requeue(db, job_ids=redeliver)
    return sorted(queued + redeliver)


def release_dead_local_leases(db: Database, host: str) -> int:
    """Expire at once the leases of processes on this host that no longer exist (a crash or reboot), so
    their jobs are taken again without waiting for the lease to run out. Owners look like host:pid:role."""
    now = utcnow()
    released = 0
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.state.in_(LEASED), Job.lease_owner.like(f"{host}:%"))):
            try:
                pid = int(job.lease_owner.split(":")[1])
                os.kill(pid, 0)
                continue  # still alive
            except ProcessLookupError:
                pass
            except (ValueError, IndexError, PermissionError):
                continue
            job.lease_expires_at = now
            add_event(s, EventKind.LEASE_EXPIRED, series_id=job.series_id, job_id=job.id,
                      detail=f"{job.lease_owner} is gone")
            released += 1
    return released


def expired_leases(db: Database) -> list[tuple[int, str]]:
    with db.session() as s:
        return list(s.execute(select(Job.id, Job.lease_owner).where(
            Job.state.in_(LEASED), Job.lease_expires_at < utcnow())).all())


def counts(db: Database) -> dict[str, dict[str, int]]:
    with db.session() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        n_inst = s.scalar(select(func.count()).select_from(Instance)) or 0
        n_studies = s.scalar(select(func.count()).select_from(Study)) or 0
    return {"jobs": jobs, "series": series, "totals": {"studies": n_studies, "instances": n_inst}}
