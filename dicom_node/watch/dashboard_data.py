"""What the dashboard pages and the JSON API read beyond ``admin.job_rows``: a series' timeline, hourly
throughput and latency, disk use, and the geometry of the pages' bar charts (drawn as inline SVG by the
templates, so that nothing is fetched from the internet, which hospital networks block anyway)."""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
from dataclasses import dataclass

from sqlalchemy import select

from storage.db import Database
from storage.latency import finished_latencies
from storage.models import Event, Job, utcnow
from storage.states import JobState, Verdict

from ..config import Settings

STAGES = ("load", "preprocess", "predict", "tta", "postprocess", "quality", "encode", "send")
STATE_COLOURS: dict[JobState, str] = {
    JobState.QUEUED: "#6c757d", JobState.RUNNING: "#0d6efd", JobState.DELIVERING: "#6610f2",
    JobState.SENDING: "#6610f2", JobState.REVIEW: "#fd7e14", JobState.DONE: "#198754", JobState.FAILED: "#dc3545",
    JobState.SKIPPED: "#adb5bd", JobState.REJECTED: "#6f42c1", JobState.DROPPED: "#495057"}
VERDICT_COLOURS: dict[Verdict, str] = {Verdict.PASS: "#198754", Verdict.WARN: "#b8860b", Verdict.FAIL: "#dc3545"}


def job_timeline(db: Database, job_id: int) -> list[dict]:
    """Every event of the job's series (earlier and later jobs' too: a retry's story spans them)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return []
        evs = s.scalars(select(Event).where(Event.series_id == job.series_id).order_by(Event.at, Event.id)).all()
        return [{"at": e.at.isoformat(timespec="milliseconds"), "kind": e.kind, "job": e.job_id, "detail": e.detail}
                for e in evs]


def hourly(db: Database, hours: int = 24) -> list[dict]:
    """Per hour over the last ``hours``: jobs finished, and the median/95th percentile of the time from last
    image to delivery with review waits left out (what the node, not the reviewer, spent)."""
    since = utcnow() - dt.timedelta(hours=hours)
    with db.session() as s:
        rows = finished_latencies(s, since)
    buckets: dict[int, list[float]] = {h: [] for h in range(hours)}
    for fin, took in rows:
        h = int((fin - since).total_seconds() // 3600)
        if 0 <= h < hours and took.node_s is not None:
            buckets[h].append(took.node_s)
    out = []
    for h in range(hours):
        d = sorted(buckets[h])
        out.append({"hour": (since + dt.timedelta(hours=h)).strftime("%H:00"), "done": len(d),
                    "p50_s": statistics.median(d) if d else None,
                    "p95_s": d[min(len(d) - 1, round(0.95 * (len(d) - 1)))] if d else None})
    return out


def disk(settings: Settings) -> dict:
    u = shutil.disk_usage(settings.data_dir)
    incoming = settings.data_dir / "incoming"
    used = sum(p.stat().st_size for p in incoming.rglob("*.dcm")) if incoming.exists() else 0
    return {"total_bytes": u.total, "free_bytes": u.free, "stored_images_bytes": used,
            "floor_bytes": settings.scp.min_free_disk_mb * 1_000_000}


def age(seconds: float) -> str:
    """A waiting time as people read it: seconds, then minutes, then hours; "-" for none."""
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Bar:
    #: the bar's slot starts at ``left``; the bar itself at ``x``, a unit in, so that neighbours do not touch
    left: float
    x: float
    y: float
    width: float
    height: float
    label: str
    value: float


@dataclass(frozen=True)
class BarChart:
    """A bar chart's geometry in SVG user units; ``templates/charts.html`` draws it."""

    width: int
    height: int
    bars: list[Bar]
    colour: str
    unit: str
    top: float
    #: every fourth bar is labelled under the axis (24 hour labels do not fit side by side)
    label_every: int = 4


def bar_chart(values: list[float | None], labels: list[str], colour: str, unit: str, width: int = 560,
              height: int = 140) -> BarChart:
    vals = [v or 0 for v in values]
    top = max(vals + [1e-9])
    bw = width / max(len(vals), 1)
    bars = []
    for i, (v, lab) in enumerate(zip(vals, labels, strict=True)):
        bh = (height - 10) * v / top
        bars.append(Bar(left=i * bw, x=i * bw + 1, y=height - bh, width=bw - 2, height=bh, label=lab, value=v))
    return BarChart(width=width, height=height, bars=bars, colour=colour, unit=unit, top=top)
