"""The timeline of each series (table ``events``) and the admin audit trail (table ``audit``).

Why one module: every state change elsewhere in storage writes its event (and an admin's action its audit
row) through these functions, inside the same transaction as the change; keeping them apart from the
modules that change state lets jobs, review and the outbox all depend on it without depending on each other.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from .db import Database
from .models import AuditEntry, Event, Job, Series, utcnow


def add_event(s, kind: str, *, series_id: int | None = None, job_id: int | None = None, study_id: int | None = None,
              detail: str = "", at: dt.datetime | None = None) -> Event:
    """Append one timeline event (inside the caller's transaction, so state and event agree); returned so a
    caller can update an aggregated event later."""
    if study_id is None and series_id is not None:
        study_id = s.scalar(select(Series.study_id).where(Series.id == series_id))
    ev = Event(kind=kind, study_id=study_id, series_id=series_id, job_id=job_id, detail=detail[:2000],
               at=at or utcnow())
    s.add(ev)
    return ev


def event(db: Database, kind: str, **kw) -> None:
    with db.session() as s:
        add_event(s, kind, **kw)


def job_event(db: Database, job_id: int, kind: str, detail: str = "") -> None:
    """A timeline event for a job (on its series' timeline)."""
    with db.session() as s:
        add_event(s, kind, series_id=s.scalar(select(Job.series_id).where(Job.id == job_id)), job_id=job_id,
                  detail=detail)


def add_audit(s, actor: str, address: str, action: str, job_id: int | None, outcome: str, detail: str = "") -> None:
    """One row of the admin audit trail (inside the caller's transaction)."""
    s.add(AuditEntry(actor=(actor or "unknown")[:128], address=address[:128], action=action[:32], job_id=job_id,
                     outcome=outcome[:32], detail=detail[:2000], at=utcnow()))


def audit_log(db: Database, job_id: int | None = None, limit: int = 200) -> list[dict]:
    """The newest audit rows (of one job, or all), newest first."""
    with db.session() as s:
        q = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(AuditEntry.job_id == job_id)
        return [{"at": a.at.isoformat(timespec="milliseconds"), "actor": a.actor, "address": a.address,
                 "action": a.action, "job": a.job_id, "outcome": a.outcome, "detail": a.detail}
                for a in s.scalars(q)]
