"""The JSON API under ``/api/`` (what scripts and the dashboard's buttons call); every route needs the token
when one is configured. State-changing calls are also checked by web_security.WebGuard (cross-site)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from storage import deliveries
from storage.accuracy import correction_rows
from storage.jobs import counts, requeue
from storage.states import ReviewDecision
from storage.timeline import audit_log

from ..learn.accuracy import accuracy_summary
from .accuracy_view import MAX_CORRECTIONS
from .admin import destination_rows, job_rows
from .dashboard_data import disk, hourly, job_timeline
from .decisions import decide
from .web_context import Context, client_address, require_token

#: Most rows one call returns, whatever ``limit`` asks for.
MAX_JOBS, MAX_DELIVERIES, MAX_AUDIT, MAX_HOURS = 1000, 1000, 5000, 24 * 14

router = APIRouter(prefix="/api", dependencies=[Depends(require_token)])


@router.get("/status")
def api_status(ctx: Context) -> dict[str, Any]:
    return {**counts(ctx.db), "disk": disk(ctx.settings)}


@router.get("/destinations")
def api_destinations(ctx: Context) -> list[dict[str, Any]]:
    return destination_rows(ctx.db, ctx.settings)


@router.get("/deliveries")
def api_deliveries(ctx: Context, state: str | None = None, destination: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
    return deliveries.list_items(ctx.db, state, destination, limit=min(limit, MAX_DELIVERIES))


@router.get("/jobs")
def api_jobs(ctx: Context, limit: int = 50, state: str | None = None) -> list[dict[str, Any]]:
    return job_rows(ctx.db, min(limit, MAX_JOBS), state)


@router.get("/jobs/{job_id}")
def api_job(job_id: int, ctx: Context) -> dict[str, Any]:
    rows = job_rows(ctx.db, 1, job_id=job_id)
    if not rows:
        raise HTTPException(404, "no such job")
    return {**rows[0], "timeline": job_timeline(ctx.db, job_id)}


@router.post("/jobs/{job_id}/retry")
def api_retry(job_id: int, request: Request, ctx: Context) -> dict[str, Any]:
    """Queue a failed (or finished) job again; audited with how the caller was let in and from where."""
    actor = "web (token)" if ctx.token else "web (loopback, no token)"
    done = requeue(ctx.db, job_ids=[job_id], actor=actor, address=client_address(request), action="retry")
    if job_id not in done:
        raise HTTPException(409, "job is running or does not exist")
    return {"job": job_id, "state": job_rows(ctx.db, 1, job_id=job_id)[0]["state"]}


@router.get("/audit")
def api_audit(ctx: Context, limit: int = 200, job: int | None = None) -> list[dict[str, Any]]:
    """The admin audit trail, newest first: who did what, from where, when, and how it ended."""
    return audit_log(ctx.db, job, min(limit, MAX_AUDIT))


@router.post("/jobs/{job_id}/approve")
async def api_approve(job_id: int, request: Request) -> dict[str, Any]:
    return await decide(request, job_id, ReviewDecision.APPROVED)


@router.post("/jobs/{job_id}/reject")
async def api_reject(job_id: int, request: Request) -> dict[str, Any]:
    return await decide(request, job_id, ReviewDecision.REJECTED)


@router.get("/throughput")
def api_throughput(ctx: Context, hours: int = 24) -> list[dict[str, Any]]:
    return hourly(ctx.db, min(hours, MAX_HOURS))


@router.get("/corrections")
def api_corrections(ctx: Context, limit: int = 200) -> list[dict[str, Any]]:
    """The radiologists' corrections, newest first: state, reason, who and where from, Dice per structure."""
    return correction_rows(ctx.db, max(0, min(limit, MAX_CORRECTIONS)))


@router.get("/accuracy")
def api_accuracy(ctx: Context) -> dict[str, Any]:
    """Per model version and structure: count, median, spread, rolling median, control limits and points."""
    return accuracy_summary(ctx.settings, ctx.db)
