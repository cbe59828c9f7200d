"""The quality gate's verdicts in the database and the review of held results: per-structure checks, the
job's overall verdict, holding a job for a person, and that person's approve or reject.

Why its own module: a review decision is an admin action with an audit row and a compare-and-set on the
job, apart from the workers' queue; the dashboard, the CLI and the pipeline reach it here.
"""

from __future__ import annotations

import json
from typing import cast

from sqlalchemy import Table, func, select, update

from .db import Database
from .models import Job, QualityCheck, utcnow
from .rows import get_row, rowcount
from .states import AuditOutcome, EventKind, JobState, ReviewDecision, Verdict
from .timeline import add_audit, add_event


def save_quality(db: Database, job_id: int, verdict: str, summary: str,
                 structures: list[tuple[str, str, str, dict]]) -> None:
    """Store the gate's verdict: one row per structure (name, verdict, reason, metrics), the job's overall
    verdict, and a "quality" event with the summary, in one transaction."""
    with db.session() as s:
        job = get_row(s, Job, job_id)
        # a repeated attempt replaces the checks of the one before
        s.execute(cast(Table, QualityCheck.__table__).delete().where(QualityCheck.job_id == job_id))
        for name, v, reason, metrics in structures:
            s.add(QualityCheck(job_id=job_id, structure=name[:32], verdict=v, reason=reason,
                               metrics=json.dumps(metrics)))
        job.quality = verdict
        add_event(s, EventKind.QUALITY, series_id=job.series_id, job_id=job_id, detail=summary)


def quality_of(db: Database, job_id: int) -> tuple[str, str, str]:
    """(verdict, review decision, one-line summary of what failed) of a job."""
    with db.session() as s:
        job = get_row(s, Job, job_id)
        bad = s.execute(select(QualityCheck.structure, QualityCheck.reason).where(
            QualityCheck.job_id == job_id, QualityCheck.verdict == Verdict.FAIL).order_by(QualityCheck.id)).all()
        return job.quality, job.review, " | ".join(f"{n.lower()}: {r}" for n, r in bad)


def hold_for_review(db: Database, job_id: int, detail: str) -> None:
    """The result waits for a person: state ``review``, no lease (nothing claims it; it survives restarts)."""
    with db.session() as s:
        job = get_row(s, Job, job_id)
        job.state, job.lease_owner, job.lease_expires_at = JobState.REVIEW, "", None
        job.reason = detail[:4000]
        add_event(s, EventKind.REVIEW, series_id=job.series_id, job_id=job_id, detail=detail)


def decide_review(db: Database, job_id: int, decision: str, who: str, address: str = "", note: str = "") -> bool:
    """Approve or reject a held job, once: only a job in ``review`` changes, in one compare-and-set update, so
    two approvals (two admins, a double click) cannot both send. Approved goes back to the queue, and a
    worker delivers the existing result to the destinations that were holding it; rejected is final.
    Returns False when the job is not (or no longer) waiting for review."""
    if decision not in (ReviewDecision.APPROVED, ReviewDecision.REJECTED):
        raise ValueError(decision)
    now = utcnow()
    values = dict(review=decision, reviewed_by=who[:128], reviewed_from=address[:64], reviewed_at=now,
                  review_note=note[:4000])
    if decision == ReviewDecision.APPROVED:
        values.update(state=JobState.QUEUED, attempts=0, next_attempt_at=None, reason="")
    else:
        values.update(state=JobState.REJECTED, finished_at=now, reason=f"rejected in review: {note}" if note else
                      "rejected in review")
    action = "approve" if decision == ReviewDecision.APPROVED else "reject"
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.REVIEW).values(**values))
        if rowcount(res) == 1:
            add_audit(s, who, address, action, job_id, AuditOutcome.DONE, note)
            detail = f"by {who}" + (f" from {address}" if address else "") + (f": {note}" if note else "")
            add_event(s, EventKind(decision), series_id=s.scalar(select(Job.series_id).where(Job.id == job_id)),
                      job_id=job_id, detail=detail)
            return True
    with db.session() as s:  # refused: the audit trail keeps refused actions too
        exists = s.get(Job, job_id) is not None
        add_audit(s, who, address, action, job_id if exists else None, AuditOutcome.REFUSED,
                  "job is not waiting for review" if exists else f"job {job_id}: no such job")
    return False


def quality_counts(db: Database) -> dict[str, int]:
    """Jobs by quality verdict (those the gate has judged)."""
    with db.session() as s:
        return dict(s.execute(select(Job.quality, func.count()).where(Job.quality != "").group_by(Job.quality)).all())
