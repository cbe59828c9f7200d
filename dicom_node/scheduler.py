"""The periodic work of the node, driven by APScheduler: the completion scan, job dispatch, learning rounds.

Both run in this one process's scheduler (``max_instances=1``, so a slow scan never overlaps itself);
the database, not the scheduler, says which series and jobs are due, so a restart loses nothing. The
completion check (decide/completion.py) also runs between scans, woken by the recorder, and a series it
judges complete wakes the dispatch at once: the result does not wait for the next tick of either.

Scheduled learning rounds (``[learning] enabled``, ``schedule``) run as a niced child process
(``python -m dicom_node learn --json``) from a thread of their own: minutes of CPU that must never hold up the
listener, the worker or the scan, and that the operating system gives way to them. A file lock in the data folder
keeps to one round at a time, also across node processes on the host and against a manual ``dicom-node learn``
started through the scheduler path.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from storage.db import Database
from storage.instances import purge_delivered_images
from storage.jobs import expired_leases, release_dead_local_leases

from .config import Settings
from .decide.completion import Completion
from .pipeline import Pipeline
from .repeats import Repeats

log = logging.getLogger("dicom_node.scheduler")


class NodeScheduler:
    def __init__(self, settings: Settings, db: Database, pipeline: Pipeline):
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self.completion = Completion(settings, db, on_queued=self.wake_dispatch)
        self._woken = threading.Event()
        self._round: threading.Thread | None = None
        #: run after each completion scan: the corrections intake settles corrections that arrived before their
        #: series' result (injected by the service: a stage may not import a later one)
        self.after_scan: Callable[[], object] | None = None
        self._repeats = {task: Repeats(log, task) for task in (
            "learning round: counting new corrections", "watchdog", "retention purge", "completion scan",
            "settling waiting corrections", "dispatch")}

    def start(self) -> None:
        s = self.settings
        self.completion.start()
        self.completion.check_all()  # series that were arriving before this start: ask their sources
        self.sched.add_job(self._scan, "interval", seconds=s.series.scan_interval_seconds, id="completion-scan")
        if s.worker.enabled:
            self.sched.add_job(self._dispatch, "interval", seconds=s.worker.poll_seconds, id="dispatch")
        self.sched.add_job(self._watchdog, "interval", seconds=max(5.0, s.worker.lease_seconds / 3), id="watchdog")
        if s.retention.purge_images_after_hours > 0:
            self.sched.add_job(self._purge, "interval", minutes=10, id="retention-purge")
        if s.learning.enabled:
            self.sched.add_job(self._learn, CronTrigger.from_crontab(s.learning.schedule), id="learning-round")
        self.sched.start()

    def _learn(self) -> None:
        """Start a learning round in its own thread if enough corrections arrived since the serving model was
        made and no round is running."""
        if self._round is not None and self._round.is_alive():
            log.info("learning round: the previous one is still running")
            return
        try:
            from storage.holdout import new_since

            from .learn.registry import serving_checkpoint

            version = serving_checkpoint(self.settings, self.db)[0]
            n = len(new_since(self.db, version))
        except Exception as exc:
            self._repeats["learning round: counting new corrections"].failed(exc)
            return
        self._repeats["learning round: counting new corrections"].ok()
        need = self.settings.learning.min_new_corrections
        if n < need:
            log.info("learning round not started: %d new corrections since model %s (waits for %d)", n, version,
                     need)
            return
        self._round = threading.Thread(target=run_learning_child, args=(self.settings,), name="learning-round",
                                       daemon=True)
        self._round.start()

    def _watchdog(self) -> None:
        """Jobs of workers on this host that died are released at once; expired leases elsewhere are reported
        (any worker's next claim takes them)."""
        with self._repeats["watchdog"]:
            release_dead_local_leases(self.db, socket.gethostname())
            for job_id, owner in expired_leases(self.db):
                log.warning("job %s: lease of %s expired; waiting for a worker to take it over", job_id, owner)

    def _purge(self) -> None:
        with self._repeats["retention purge"]:
            n = purge_delivered_images(self.db, self.settings.retention.purge_images_after_hours,
                                       self.settings.data_dir)
            if n:
                log.info("retention: removed %d stored images of delivered series", n)

    def _scan(self) -> None:
        with self._repeats["completion scan"]:
            self.completion.scan()
        if self.after_scan is not None:
            with self._repeats["settling waiting corrections"]:
                self.after_scan()

    def wake_dispatch(self) -> None:
        """A job was queued: run the dispatch now rather than at its next tick. If it is running, the flag
        makes it look once more before it ends (a wake-up between its last look and its end is not lost)."""
        self._woken.set()
        job = self.sched.get_job("dispatch") if self.settings.worker.enabled else None
        if job is not None:
            try:
                job.modify(next_run_time=dt.datetime.now(dt.UTC))
            except Exception:  # the scheduler is shutting down
                log.debug("dispatch not woken", exc_info=True)

    def _dispatch(self) -> None:
        with self._repeats["dispatch"]:
            while True:
                self._woken.clear()
                self.pipeline.drain()
                if not self._woken.is_set():
                    break

    def stop(self, timeout: float = 10) -> None:
        """Stop the completion checks and the timers without waiting for a running dispatch: a job in progress is
        left to its lease (taken again at the next start, as after a crash), no further job is claimed."""
        self.pipeline.stopping.set()
        self.completion.stop(timeout)
        self.sched.shutdown(wait=False)


def learning_command(settings: Settings) -> list[str]:
    """The child's command line: the same interpreter and configuration as this node."""
    cmd = [sys.executable, "-m", "dicom_node"]
    if settings.source is not None:
        cmd += ["--config", str(settings.source)]
    return cmd + ["learn", "--json"]


def run_learning_child(settings: Settings, niceness: int = 15) -> int | None:
    """Run one round as a niced child process under the data folder's round lock; returns its exit status, or
    None when another round holds the lock."""
    import fcntl

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "learning.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("learning round not started: another round is running")
            return None
        log.info("learning round started (niced child process)")
        proc = subprocess.run(learning_command(settings), preexec_fn=lambda: os.nice(niceness),
                              capture_output=True, text=True)
        if proc.returncode == 0:
            log.info("learning round finished: %s", _decision(proc.stdout))
        else:
            log.warning("learning round stopped: %s", (proc.stderr.strip().splitlines() or ["(no message)"])[-1])
        return proc.returncode


def _decision(stdout: str) -> str:
    import json

    try:
        return str(json.loads(stdout).get("decision", ""))
    except ValueError:
        return "(no summary)"
