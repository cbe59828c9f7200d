"""Prometheus ``/metrics`` (behind the token) and ``/healthz`` (open: load balancers and systemd probes ask
it without credentials, and it tells nothing about patients)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select

from storage.db import Database
from storage.jobs import counts
from storage.models import Job, utcnow
from storage.review import quality_counts
from storage.states import JobState, Verdict

from ..config import Settings
from ..learn.accuracy import accuracy_summary
from .accuracy_view import accuracy_metrics
from .admin import destination_rows
from .dashboard_data import STAGES
from .web_context import Context, require_token

router = APIRouter()


class NodeCollector:
    """Prometheus metrics read from the database at scrape time (so every worker's work is counted) plus the
    listener's C-STORE counters."""

    def __init__(self, settings: Settings, db: Database, scp_stats: dict | None,
                 record_backlog: Callable[[], int] = lambda: 0):
        self.settings, self.db, self.scp_stats = settings, db, scp_stats
        self.record_backlog = record_backlog

    def collect(self) -> Iterator[Metric]:
        c = counts(self.db)
        g = GaugeMetricFamily("dicomnode_jobs", "Jobs by state", labels=["state"])
        for st in JobState:
            g.add_metric([st.value], c["jobs"].get(st, 0))
        yield g
        g = GaugeMetricFamily("dicomnode_series", "Series by state", labels=["state"])
        for series_state, n in c["series"].items():
            g.add_metric([series_state], n)
        yield g
        yield GaugeMetricFamily("dicomnode_instances", "Stored instances", value=c["totals"]["instances"])
        yield GaugeMetricFamily("dicomnode_unrecorded_instances",
                                "Instances on disk whose database row is not committed yet (normally 0)",
                                value=self.record_backlog())
        yield GaugeMetricFamily("dicomnode_disk_free_bytes", "Free disk in the data folder",
                                value=shutil.disk_usage(self.settings.data_dir).free)
        with self.db.session() as s:
            timings = s.scalars(select(Job.timings).where(Job.state == JobState.DONE)).all()
            oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
        sums = CounterMetricFamily("dicomnode_stage_seconds", "Seconds spent per stage in done jobs", labels=["stage"])
        for stage in STAGES:
            sums.add_metric([stage], sum(json.loads(t or "{}").get(stage, 0.0) for t in timings))
        yield sums
        qc = CounterMetricFamily("dicomnode_quality", "Jobs judged by the quality gate, by verdict",
                                 labels=["verdict"])
        judged = quality_counts(self.db)
        for v in (Verdict.PASS, Verdict.WARN, Verdict.FAIL):
            qc.add_metric([v.value], judged.get(v, 0))
        yield qc
        yield _serving_model(self.db)
        yield GaugeMetricFamily("dicomnode_review_waiting", "Results held for review (quality gate)",
                                value=c["jobs"].get(JobState.REVIEW, 0))
        yield GaugeMetricFamily("dicomnode_oldest_queued_age_seconds", "Age of the oldest queued job",
                                value=(utcnow() - oldest).total_seconds() if oldest else 0.0)
        yield from self._destinations()
        yield from accuracy_metrics(accuracy_summary(self.settings, self.db))
        if self.scp_stats is not None:
            cs = CounterMetricFamily("dicomnode_cstore", "C-STORE requests handled", labels=["result"])
            for k, v in self.scp_stats.items():
                cs.add_metric([k], v)
            yield cs

    def _destinations(self) -> Iterator[Metric]:
        dests = destination_rows(self.db, self.settings)
        up = GaugeMetricFamily("dicomnode_destination_up", "1 while the destination answers, 0 while it is down",
                               labels=["destination"])
        waiting = GaugeMetricFamily("dicomnode_deliveries_waiting",
                                    "Deliveries not yet sent (or not yet committed) per destination",
                                    labels=["destination"])
        oldest_w = GaugeMetricFamily("dicomnode_oldest_waiting_delivery_age_seconds",
                                     "Age of the oldest delivery still waiting, per destination",
                                     labels=["destination"])
        failed = GaugeMetricFamily("dicomnode_deliveries_failed", "Deliveries given up (dead letter) per destination",
                                   labels=["destination"])
        for d in dests:
            up.add_metric([d["destination"]], 1 if d["up"] else 0)
            waiting.add_metric([d["destination"]], d["waiting"])
            oldest_w.add_metric([d["destination"]], d["oldest_waiting_s"])
            failed.add_metric([d["destination"]], d["failed"])
        yield from (up, waiting, oldest_w, failed)


def _serving_model(db: Database) -> Metric:
    """Which model serves (the registry's), so a dashboard can tell what wrote each period's results."""
    from storage.model_versions import serving_digest

    g = GaugeMetricFamily("dicomnode_model_serving_info", "The model serving new jobs (1), by version and sha256",
                          labels=["version", "sha256"])
    row = serving_digest(db)
    if row is not None:
        g.add_metric([row[0], row[2]], 1)
    return g


@router.get("/healthz")
def healthz(ctx: Context) -> JSONResponse:
    """200 while the database answers, the listener runs and the disk is above the node's floor; else 503."""
    ok_db = True
    try:
        counts(ctx.db)
    except Exception:
        ok_db = False
    floor_mb = ctx.settings.scp.min_free_disk_mb
    free = shutil.disk_usage(ctx.settings.data_dir).free
    body = {"status": "ok", "database": ok_db, "listener": bool(ctx.scp_alive()),
            "disk_free_mb": round(free / 1e6), "disk_floor_mb": floor_mb,
            "unrecorded_instances": ctx.record_backlog()}
    healthy = ok_db and body["listener"] and free / 1e6 >= floor_mb
    body["status"] = "ok" if healthy else "degraded"
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics", dependencies=[Depends(require_token)])
def metrics(ctx: Context) -> Response:
    return Response(generate_latest(ctx.registry), media_type="text/plain; version=0.0.4")
