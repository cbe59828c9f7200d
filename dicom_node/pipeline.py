"""One job from queued to encoded, orchestrating the stages: infer (load → preprocess/predict/postprocess,
sides, volumes) → gate (quality checks) → encode (SEG + SR, checked) → release for delivery → the outbox.

The gate (gate/quality.py) judges every result before anything is encoded or sent; what a failed result does
at each destination (hold for review, send flagged, drop) is decided by gate/release.py and carried out in one
place, :meth:`Pipeline.release_for_delivery`.

The job's compute part ends with the encoded files put in the outbox (one row per destination, job state
``delivering``); the sender loop (deliver/outbox.py) sends them, so a worker never waits on a PACS.
Each stage's duration goes into the job's ``timings`` and each step onto the timeline (events table). While a
job runs, a heartbeat renews its lease so that another worker takes it over only if this one dies. An
exception marks the job for retry (with backoff) or failure, and never escapes into the scheduler.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from inference.model_card import ModelCardError
from storage import deliveries
from storage.db import Database
from storage.filestore import FileStore, UnsafePath
from storage.jobs import (
    add_timing,
    claim_job,
    fail_or_retry,
    heartbeat,
    save_volumes,
    set_state,
    superseded_by,
)
from storage.models import Job, utcnow
from storage.review import hold_for_review, quality_of, save_quality
from storage.rows import get_row
from storage.series import series_instances
from storage.states import EventKind, JobState, Verdict
from storage.timeline import event, job_event

from .config import Settings
from .deliver.delivery import outbox_files
from .encode.results import encode_results
from .encode.validate import InvalidResult
from .errors import Explained, admin_message
from .gate.quality import QualityReport, assess
from .gate.release import release_plan
from .infer.compute import NotSegmentable, segment_series
from .notify import notify

log = logging.getLogger("dicom_node.pipeline")


class LeaseLost(RuntimeError):
    """Another worker took this job over (our lease expired): stop without touching it."""


def worker_id(role: str = "worker") -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


class _Heartbeat:
    """Renews the job's lease every third of the lease period while the job runs."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_seconds: float):
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}")

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                if not heartbeat(self.db, self.job_id, self.owner, self.lease):
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: try again at the next beat
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def check(self) -> None:
        if self.lost.is_set() or not heartbeat(self.db, self.job_id, self.owner, self.lease):
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")


def _load_failure(exc: BaseException) -> str:
    """Why the serving model could not be loaded, in words (a model file's path is no patient data)."""
    if isinstance(exc, (Explained, ModelCardError, UnsafePath)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"its checkpoint file is missing ({exc.filename or exc})"
    return admin_message(exc, "loading the serving model")


class Pipeline:
    def __init__(self, settings: Settings, db: Database, store: FileStore, predictor_factory, owner: str | None = None,
                 model_source: Callable[[], tuple[str, Path, str]] | None = None):
        """``predictor_factory``: loads a model; called with no argument (the configured one) without
        ``model_source``, else with the checkpoint file to load. ``model_source``: (version, file, sha256) of
        the registry's serving model, asked at the start of each job (serve and worker), so that a promoted
        model is used from the next job on without a restart."""
        self.settings = settings
        self.db = db
        self.store = store
        self._predictor_factory = predictor_factory
        self._model_source = model_source
        self._predictor = None
        self.owner = owner or worker_id()
        #: called after a result went into the outbox (serve: wakes its sender thread at once)
        self.on_outbox: Callable[[], None] = lambda: None
        #: set when the node stops: no further job is claimed (the running one is left to its lease)
        self.stopping = threading.Event()
        self.current_job: int | None = None

    @property
    def predictor(self):
        """The loaded model, created on first use (the registry's serving one where there is a registry)."""
        if self._predictor is None:
            if self._model_source is None:
                self._predictor = self._predictor_factory()
            else:
                try:
                    self._predictor = self._serving_predictor(None)
                except Exception as exc:  # the node still starts, on its configured model; each job tries again
                    log.error("the serving model could not be loaded (%s); starting on the configured model",
                              _load_failure(exc))
                    self._predictor = self._predictor_factory()
        return self._predictor

    def _serving_predictor(self, job_id: int | None):
        """The model for a job starting now: the loaded one while it is still the registry's serving model (one
        cheap query), else the promoted one, loaded here. A job that is running keeps the model it started
        with (it holds its own reference). If the promoted one cannot be loaded, the loaded one stays and the
        reason goes on the job's timeline, in words; with no model loaded yet, the error is the job's."""
        loaded = self._predictor
        if self._model_source is None:
            return self.predictor
        try:
            version, path, sha = self._model_source()
            if loaded is not None and loaded.card.checkpoint_sha256 == sha:
                return loaded
            new = self._predictor_factory(path)
            if new.card.checkpoint_sha256 != sha:
                raise Explained(f"its file {path} changed after it was registered (its sha256 is not the "
                                "registry's): promote a registered version, or restart to register the file")
        except Exception as exc:
            if loaded is None:
                raise
            why = _load_failure(exc)
            detail = (f"the serving model could not be loaded, so this job runs on model {loaded.card.version}: "
                      f"{why}")
            log.error("job %s: %s", job_id, detail)
            log.debug("loading the serving model failed\n%s", traceback.format_exc())
            if job_id is not None:
                job_event(self.db, job_id, EventKind.MODEL, detail)
            return loaded
        before = loaded.card.version if loaded is not None else ""
        self._predictor = new
        if loaded is not None:
            on_gpu = str(getattr(loaded, "device", "")).startswith("cuda")
            del loaded
            if on_gpu:  # hand the old model's memory back to the card, not only to torch's cache
                import torch

                torch.cuda.empty_cache()
            log.info("switched to model %s (was %s)", version, before)
            if job_id is not None:
                job_event(self.db, job_id, EventKind.MODEL, f"this job runs on model {version}, promoted since the "
                          f"last job (was {before})")
        return new

    def run_next(self) -> bool:
        """Run one due job if there is one; returns whether a job was run."""
        w = self.settings.worker
        job_id = claim_job(self.db, self.owner, w.lease_seconds, w.max_attempts)
        if job_id is None:
            return False
        self.run(job_id)
        return True

    def drain(self) -> int:
        n = 0
        while not self.stopping.is_set() and self.run_next():
            n += 1
        return n

    def run(self, job_id: int) -> None:
        doing = ["starting the job"]  # what the job was doing, for the reason an admin reads
        self.current_job = job_id
        try:
            with _Heartbeat(self.db, job_id, self.owner, self.settings.worker.lease_seconds) as hb:
                self._run(job_id, hb, doing)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception as exc:  # a job failure must not stop the worker
            err = admin_message(exc, doing[-1], job_id)
            log.error("job %s failed: %s", job_id, err)
            # the exception itself (its text may quote header values) only at debug level, for whoever fixes it
            log.debug("job %s: %s while %s\n%s", job_id, type(exc).__name__, doing[-1], traceback.format_exc())
            w = self.settings.worker
            state = fail_or_retry(self.db, job_id, err, w.max_attempts, w.retry_backoff_seconds)
            log.info("job %s is now %s", job_id, state)
            if state == JobState.FAILED:
                notify(self.settings, "job-failed", {"job": job_id, "reason": err})
        finally:
            self.current_job = None

    def _stage(self, job_id: int, name: str, t0: float) -> float:
        now = time.perf_counter()
        add_timing(self.db, job_id, name, now - t0)
        return now

    def _run(self, job_id: int, hb: _Heartbeat, doing: list[str]) -> None:
        with self.db.session() as s:
            job = get_row(s, Job, job_id)
            series_id, seg_path = job.series_id, self._result_file(job_id, job.seg_path)
        if seg_path is not None:
            # the result exists (the worker stopped after encoding): it goes to the outbox, never re-encoded
            doing.append("queueing the results for delivery")
            self._deliver(job_id, seg_path.parent, hb)
            return
        series, instances = series_instances(self.db, series_id)
        doing.append("loading the model")
        _ = self.predictor  # the first load, which falls back to the configured model
        predictor = self._serving_predictor(job_id)
        doing.append("loading the images")

        def timing(stage: str, sec: float) -> None:
            add_timing(self.db, job_id, stage, sec)
            if stage == "load":
                doing.append("running the model")

        try:
            result = segment_series(instances, predictor, timing, quality=True, tta=self.settings.quality.tta,
                                    locate=self.store.resolve)
        except NotSegmentable as exc:
            set_state(self.db, job_id, JobState.SKIPPED, event_detail=str(exc), reason=str(exc), finished_at=utcnow())
            return
        doing.append("recording the volumes")
        segments, vols, card = result.segments, result.volumes_cm3, result.card
        save_volumes(self.db, job_id, {sg.name: (sg.label.snomed_code, vols[sg.name]) for sg in segments})
        if not segments:
            set_state(self.db, job_id, JobState.DONE, event_detail="no bone structure found; nothing sent",
                      reason="no bone structure found; nothing sent", finished_at=utcnow(),
                      model_version=card.version, device=result.device)
            return
        report = self._judge(job_id, result)
        t = time.perf_counter()
        job_dir = self.store.result_path(series.study.study_uid, f"job{job_id}")
        job_dir.mkdir(parents=True, exist_ok=True)
        doing.append("encoding the SEG and SR")
        try:
            seg, path = encode_results(self.settings, result, job_dir,
                                       failed=report.short_names() if report.verdict == Verdict.FAIL else None)
        except InvalidResult as exc:
            set_state(self.db, job_id, JobState.FAILED, event_detail=str(exc), reason=str(exc), finished_at=utcnow())
            log.error("job %s: %s", job_id, exc)
            notify(self.settings, "job-failed", {"job": job_id, "reason": str(exc)})
            return
        t = self._stage(job_id, "encode", t)
        set_state(self.db, job_id, JobState.RUNNING, seg_series_uid=seg.SeriesInstanceUID,
                  seg_sop_uid=seg.SOPInstanceUID, seg_path=self.store.relative(path), model_version=card.version,
                  device=result.device)
        event(self.db, EventKind.ENCODED, series_id=series_id, job_id=job_id,
              detail=", ".join(f"{k.lower()} {v:.1f} cm3" for k, v in vols.items()))
        doing.append("queueing the results for delivery")
        outcome = self._deliver(job_id, path.parent, hb)
        log.info("job %s %s: %s", job_id, outcome, ", ".join(f"{k} {v:.1f} cm3" for k, v in vols.items()))

    def _result_file(self, job_id: int, stored: str) -> Path | None:
        """The job's encoded SEG in the data folder as it is now, if it is there (None: encode again)."""
        if not stored:
            return None
        try:
            path = self.store.resolve(stored)
        except UnsafePath as exc:
            log.warning("job %s: its result is not used and is made again: %s", job_id, exc)
            return None
        return path if path.is_file() else None

    def _judge(self, job_id: int, result) -> QualityReport:
        """The quality gate on the result, stored per structure and on the timeline; the probabilities are
        released afterwards (they are the largest arrays of the job)."""
        t = time.perf_counter()
        report = assess(result.volume, result.labels, result.segments, result.card.labels, result.probs,
                        result.tta_labels, first_labels=result.first_labels,
                        sacrum_is_pelvis=result.card.pelvis_includes_sacrum)
        result.probs = result.tta_labels = result.first_labels = None
        save_quality(self.db, job_id, report.verdict, report.summary(),
                     [(q.structure, q.verdict, q.reason, q.metrics) for q in report.structures])
        self._stage(job_id, "quality", t)
        if report.verdict != Verdict.PASS:
            log.warning("job %s: quality %s: %s", job_id, report.verdict, report.summary())
        return report

    def _deliver(self, job_id: int, job_dir: Path, hb: _Heartbeat) -> str:
        """Hand the encoded files on (unless a newer job superseded this one); returns the job's new state."""
        hb.check()  # never queue a result whose job another worker has taken over
        newer = superseded_by(self.db, job_id)
        if newer is not None:
            set_state(self.db, job_id, JobState.SKIPPED, event_detail=f"superseded by job {newer}; not sent",
                      reason=f"superseded by job {newer} (later instances arrived)", finished_at=utcnow())
            return JobState.SKIPPED
        return self.release_for_delivery(job_id, job_dir)

    def release_for_delivery(self, job_id: int, job_dir: Path) -> str:
        """The one place a checked result is let out, to the destinations :func:`release_plan` names.

        A held result waits in ``review``; an approval queues the job again, back through here. The outbox
        keeps one row per destination and job, so an approval or a retry never sends twice. Returns the job's
        new state.
        """
        verdict, review, failed = quality_of(self.db, job_id)
        plan = release_plan(verdict, review, self.settings.destinations)
        send, hold, drop = plan.send, plan.hold, plan.drop
        if drop:
            job_event(self.db, job_id, EventKind.DROPPED, f"not sent to {', '.join(d.name for d in drop)} "
                                                          f"(quality_policy drop): {failed}")
        if send or not (hold or drop):
            files = outbox_files(self.settings, job_dir)
            deliveries.enqueue(self.db, job_id, {d.name: files[d.name] for d in send})
            self.on_outbox()
        if hold:
            hold_for_review(self.db, job_id, f"quality checks failed; held for review before sending to "
                                             f"{', '.join(d.name for d in hold)}: {failed}")
            log.warning("job %s held for review: quality checks failed (%s)", job_id, failed[:300])
            notify(self.settings, "job-held", {"job": job_id, "failed": failed[:1000],
                                               "destinations": [d.name for d in hold]})
            return JobState.REVIEW
        if drop and not send:
            set_state(self.db, job_id, JobState.DROPPED, event_detail=None, finished_at=utcnow(),
                      reason=f"quality checks failed; not sent (quality_policy drop): {failed}")
            return JobState.DROPPED
        with self.db.session() as s:  # delivering, or already done when there was nothing to send
            return get_row(s, Job, job_id).state
