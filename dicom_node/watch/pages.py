"""The dashboard's HTML pages (Jinja2 templates in ``templates/``, autoescaped), the job page's previews and
its Approve/Reject forms. Every route needs the token when one is configured."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from storage.accuracy import correction_rows
from storage.jobs import counts
from storage.models import utcnow
from storage.states import JobState, ReviewDecision, Verdict
from storage.timeline import audit_log

from ..learn.accuracy import accuracy_summary
from .accuracy_view import RECENT_CORRECTIONS, control_charts
from .admin import destination_rows, job_rows
from .dashboard_data import (
    STAGES,
    STATE_COLOURS,
    VERDICT_COLOURS,
    age,
    bar_chart,
    disk,
    hourly,
    job_timeline,
)
from .decisions import decide
from .preview import preview_png
from .web_context import Context, WebContext, require_token

#: Rows on the dashboard: recent jobs, and failed jobs offered for retry.
RECENT_JOBS, FAILED_JOBS = 30, 20

TEMPLATES = Environment(loader=PackageLoader("dicom_node.watch", "templates"), autoescape=True,
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
TEMPLATES.globals.update(JobState=JobState, Verdict=Verdict, ReviewDecision=ReviewDecision, STAGES=STAGES,
                         state_colours=STATE_COLOURS, verdict_colours=VERDICT_COLOURS)
TEMPLATES.filters["age"] = age

#: The pages' only script, included verbatim by ``base.html``; web_security allows exactly it by its hash.
PAGE_SCRIPT = TEMPLATES.get_template("page.js").render()

router = APIRouter(dependencies=[Depends(require_token)])


def render(name: str, ctx: WebContext, **values) -> HTMLResponse:
    page = TEMPLATES.get_template(name).render(ae=ctx.settings.scp.ae_title, csrf=ctx.csrf_token,
                                               now=utcnow().strftime("%Y-%m-%d %H:%M"), **values)
    return HTMLResponse(page)


@router.get("/", response_class=HTMLResponse)
def dashboard(ctx: Context) -> HTMLResponse:
    hours = hourly(ctx.db)
    labels = [h["hour"] for h in hours]
    return render(
        "dashboard.html", ctx, counts=counts(ctx.db), disk=disk(ctx.settings),
        destinations=destination_rows(ctx.db, ctx.settings),
        failed=job_rows(ctx.db, FAILED_JOBS, JobState.FAILED), jobs=job_rows(ctx.db, RECENT_JOBS),
        throughput=bar_chart([h["done"] for h in hours], labels, "#198754", "jobs"),
        latency=bar_chart([h["p50_s"] for h in hours], labels, "#0d6efd", "s"))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, ctx: Context) -> HTMLResponse:
    rows = job_rows(ctx.db, 1, job_id=job_id)
    if not rows:
        raise HTTPException(404, "no such job")
    return render("job.html", ctx, job_id=job_id, j=rows[0], timeline=job_timeline(ctx.db, job_id),
                  audit=audit_log(ctx.db, job_id))


@router.get("/jobs/{job_id}/preview.png")
def preview(ctx: Context, job_id: int, structure: str | None = None) -> Response:
    png = preview_png(ctx.db, ctx.settings.data_dir, job_id, structure=structure)
    if png is None:
        raise HTTPException(404, "no result to preview")
    return Response(png, media_type="image/png")


@router.post("/jobs/{job_id}/approve")
async def form_approve(job_id: int, request: Request) -> RedirectResponse:
    await decide(request, job_id, ReviewDecision.APPROVED)
    return RedirectResponse(f"../{job_id}", status_code=303)


@router.post("/jobs/{job_id}/reject")
async def form_reject(job_id: int, request: Request) -> RedirectResponse:
    await decide(request, job_id, ReviewDecision.REJECTED)
    return RedirectResponse(f"../{job_id}", status_code=303)


@router.get("/corrections", response_class=HTMLResponse)
def corrections_page(ctx: Context) -> HTMLResponse:
    """The radiologists' corrections and what they say about each model version (docs/accuracy.md)."""
    summary = accuracy_summary(ctx.settings, ctx.db)
    return render("corrections.html", ctx, corrections=correction_rows(ctx.db, RECENT_CORRECTIONS),
                  summary=summary, charts=control_charts(summary))
