"""The periodic work of the node, driven by APScheduler: the completion scan and job dispatch.

Both run in this one process's scheduler (``max_instances=1``, so a slow scan never overlaps itself);
the database, not the scheduler, says which series and jobs are due, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import socket

from apscheduler.schedulers.background import BackgroundScheduler

from storage import queue
from storage.db import Database

from .config import Settings
from .pipeline import Pipeline
from .decide.rules import Decision, decide
from .errors import admin_message

log = logging.getLogger("dicom_node.scheduler")


def completion_scan(settings: Settings, db: Database) -> int:
    """Judge every series that has been quiet for ``stable_seconds``: queue a job or record why not."""
    n = 0
    for series_id in queue.stable_series(db, settings.series.stable_seconds):
        series, instances = queue.series_instances(db, series_id)
        try:
            d = decide(series, series.study.study_description, instances, settings.rules)
        except Exception as exc:  # one odd series must not stop the scan for all the others
            log.debug("series %s: deciding failed", series_id, exc_info=True)
            d = Decision(False, admin_message(exc, "deciding whether to segment the series"))
        job = queue.mark_judged(db, series_id, queue=d.segment, reason=d.reason, rule=d.rule, urgent=d.urgent,
                                expected_count=len(instances))
        if job is not None:
            n += 1
            if d.segment:
                log.info("series %s complete (%d slices): job %s queued", series_id, len(d.instances), job)
            else:
                log.info("series %s complete: not segmented: %s", series_id, d.reason)
    return n


class NodeScheduler:
    def __init__(self, settings: Settings, db: Database, pipeline: Pipeline):
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})

    def start(self) -> None:
        s = self.settings
        self.sched.add_job(self._scan, "interval", seconds=s.series.scan_interval_seconds, id="completion-scan")
        if s.worker.enabled:
            self.sched.add_job(self._dispatch, "interval", seconds=s.worker.poll_seconds, id="dispatch")
        self.sched.add_job(self._watchdog, "interval", seconds=max(5.0, s.worker.lease_seconds / 3), id="watchdog")
        if s.retention.purge_images_after_hours > 0:
            self.sched.add_job(self._purge, "interval", minutes=10, id="retention-purge")
        self.sched.start()

    def _watchdog(self) -> None:
        """Jobs of workers on this host that died are released at once; expired leases elsewhere are reported
        (any worker's next claim takes them)."""
        try:
            queue.release_dead_local_leases(self.db, socket.gethostname())
            for job_id, owner in queue.expired_leases(self.db):
                log.warning("job %s: lease of %s expired; waiting for a worker to take it over", job_id, owner)
        except Exception:
            log.exception("watchdog failed")

    def _purge(self) -> None:
        try:
            n = queue.purge_delivered_images(self.db, self.settings.retention.purge_images_after_hours)
            if n:
                log.info("retention: removed %d stored images of delivered series", n)
        except Exception:
            log.exception("retention purge failed")

    def _scan(self) -> None:
        try:
            completion_scan(self.settings, self.db)
        except Exception:
            log.exception("completion scan failed")

    def _dispatch(self) -> None:
        try:
            self.pipeline.drain()
        except Exception:
            log.exception("dispatch failed")

    def stop(self) -> None:
        self.sched.shutdown(wait=True)
