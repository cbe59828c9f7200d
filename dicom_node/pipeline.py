"""One job from queued to delivered: load → preprocess/predict/postprocess → encode → send.

Each stage's duration goes into the job's ``timings`` and each step onto the timeline (events table);
each send attempt is a row in ``deliveries``. While a job runs, a heartbeat renews its lease so that
another worker takes it over only if this one dies. An exception marks the job for retry (with backoff)
or failure, and never escapes into the scheduler.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from storage import queue
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Job, utcnow

from .config import Settings
from .rules import split_blocks, stack
from .sender import send_items, stow
from .seg_writer import build_seg
from .segments import split_sides
from .sr_writer import build_sr
from .validate import InvalidResult, check_seg, check_sr
from .volume import NotStackable, SeriesVolume, load_series

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
                if not queue.heartbeat(self.db, self.job_id, self.owner, self.lease):
                    self.lost.set()
                    return
            except Exception:  # a database hiccup: try again at the next beat
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def check(self) -> None:
        if self.lost.is_set() or not queue.heartbeat(self.db, self.job_id, self.owner, self.lease):
            raise LeaseLost(f"job {self.job_id} was taken over by another worker")


class Pipeline:
    def __init__(self, settings: Settings, db: Database, store: FileStore, predictor_factory, owner: str | None = None):
        self.settings = settings
        self.db = db
        self.store = store
        self._predictor_factory = predictor_factory
        self._predictor = None
        self.owner = owner or worker_id()

    @property
    def predictor(self):
        """The one loaded model, created on first use and kept for every later job."""
        if self._predictor is None:
            self._predictor = self._predictor_factory()
        return self._predictor

    def run_next(self) -> bool:
        """Run one due job if there is one; returns whether a job was run."""
        w = self.settings.worker
        job_id = queue.claim_job(self.db, self.owner, w.lease_seconds, w.max_attempts)
        if job_id is None:
            return False
        self.run(job_id)
        return True

    def drain(self) -> int:
        n = 0
        while self.run_next():
            n += 1
        return n

    def run(self, job_id: int) -> None:
        try:
            with _Heartbeat(self.db, job_id, self.owner, self.settings.worker.lease_seconds) as hb:
                self._run(job_id, hb)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception as exc:  # a job failure must not stop the worker
            err = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s", job_id, err)
            log.debug("%s", traceback.format_exc())
            w = self.settings.worker
            state = queue.fail_or_retry(self.db, job_id, err, w.max_attempts, w.retry_backoff_seconds)
            log.info("job %s is now %s", job_id, state)

    def _stage(self, job_id: int, name: str, t0: float) -> float:
        now = time.perf_counter()
        queue.add_timing(self.db, job_id, name, now - t0)
        return now

    def _run(self, job_id: int, hb: _Heartbeat) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            series_id, seg_path = job.series_id, job.seg_path
        if seg_path and Path(seg_path).is_file():
            # the result exists (an earlier attempt failed while sending): only the delivery is repeated
            self._deliver(job_id, seg_path, hb, time.perf_counter())
            return
        series, instances = queue.series_instances(self.db, series_id)
        t = time.perf_counter()
        ordered, why = stack(instances)
        if ordered is None:  # cannot happen for a job the rules queued, unless files changed since
            queue.set_state(self.db, job_id, "skipped", event_detail=why, reason=why, finished_at=utcnow())
            return
        try:
            # one block, unless the series has gaps between stations: each block is its own volume
            parts = [load_series(block) for block in split_blocks(ordered)]
        except NotStackable as exc:
            queue.set_state(self.db, job_id, "skipped", event_detail=str(exc), reason=str(exc), finished_at=utcnow())
            return
        t = self._stage(job_id, "load", t)
        predictor = self.predictor
        preds = [predictor.predict(v.array, v.row_dir, v.col_dir) for v in parts]
        for stage in ("preprocess", "predict", "postprocess"):
            if any(stage in p.timings for p in preds):
                queue.add_timing(self.db, job_id, stage, sum(p.timings.get(stage, 0.0) for p in preds))
        t = time.perf_counter()
        vol = SeriesVolume.join(parts)
        labels = preds[0].labels if len(preds) == 1 else np.concatenate([p.labels for p in preds])
        card = predictor.card
        first = vol.datasets[0]
        declared = str(first.get("ImageLaterality", "") or first.get("Laterality", "")).upper()
        seg_labels, segments = split_sides(labels, card.labels, vol.origins, vol.row_dir, vol.col_dir,
                                           vol.pixel_spacing, declared)
        cm3 = vol.volumes_cm3(seg_labels, len(segments) + 1)
        vols = {sg.name: float(cm3[sg.number]) for sg in segments}
        queue.save_volumes(self.db, job_id, {sg.name: (sg.label.snomed_code, vols[sg.name]) for sg in segments})
        if not segments:
            queue.set_state(self.db, job_id, "done", event_detail="no bone structure found; nothing sent",
                            reason="no bone structure found; nothing sent", finished_at=utcnow(),
                            model_version=card.version, device=str(predictor.device))
            return
        job_dir = self.store.result_path(series.study.study_uid, f"job{job_id}")
        job_dir.mkdir(parents=True, exist_ok=True)
        out = self.settings.output
        first_seg = None
        for seg_type in dict.fromkeys(d.seg_type for d in self.settings.destinations) or ["binary"]:
            seg = build_seg(vol.datasets, vol.to_source_order(seg_labels), segments, card, series_description=out.series_description,
                            series_number=out.series_number, manufacturer=out.manufacturer,
                            segmentation_type=seg_type.upper())
            seg.save_as(job_dir / f"SEG_{seg_type}.dcm", enforce_file_format=True)
            sr = build_sr(seg, vol.datasets, segments, vols, card, series_number=out.series_number + 1,
                          manufacturer=out.manufacturer)
            sr.save_as(job_dir / f"SR_{seg_type}.dcm", enforce_file_format=True)
            try:  # re-read what was written and compare it with the source before anything is sent
                check_seg(str(job_dir / f"SEG_{seg_type}.dcm"), vol.datasets)
                check_sr(str(job_dir / f"SR_{seg_type}.dcm"), str(job_dir / f"SEG_{seg_type}.dcm"), vol.datasets)
            except InvalidResult as exc:
                queue.set_state(self.db, job_id, "failed", event_detail=str(exc), reason=str(exc), finished_at=utcnow())
                log.error("job %s: %s", job_id, exc)
                return
            first_seg = first_seg or (seg, job_dir / f"SEG_{seg_type}.dcm")
        seg, path = first_seg
        t = self._stage(job_id, "encode", t)
        queue.set_state(self.db, job_id, "running", seg_series_uid=seg.SeriesInstanceUID,
                        seg_sop_uid=seg.SOPInstanceUID, seg_path=str(path), model_version=card.version,
                        device=str(predictor.device))
        queue.event(self.db, "encoded", series_id=series_id, job_id=job_id,
                    detail=", ".join(f"{k.lower()} {v:.1f} cm3" for k, v in vols.items()))
        self._deliver(job_id, str(path), hb, t)
        log.info("job %s done: %s", job_id, ", ".join(f"{k} {v:.1f} cm3" for k, v in vols.items()))

    def _deliver(self, job_id: int, path: str, hb: _Heartbeat, t: float) -> None:
        hb.check()  # never send a result whose job another worker has taken over
        newer = queue.superseded_by(self.db, job_id)
        if newer is not None:
            queue.set_state(self.db, job_id, "skipped", event_detail=f"superseded by job {newer}; not sent",
                            reason=f"superseded by job {newer} (later instances arrived)", finished_at=utcnow())
            return
        queue.set_state(self.db, job_id, "sending", event_detail=", ".join(d.name for d in self.settings.destinations))
        errors = self._send(job_id, Path(path).parent)
        self._stage(job_id, "send", t)
        if errors:
            raise RuntimeError("delivery failed: " + "; ".join(errors))
        queue.set_state(self.db, job_id, "done", event_detail="", reason="", finished_at=utcnow())

    def _send(self, job_id: int, job_dir: Path) -> list[str]:
        """Send each destination its profile's files (SEG type, SR or not), retrying each with exponential
        backoff; returns what still failed."""
        errors = []
        done = queue.delivered_to(self.db, job_id)  # a repeated delivery skips destinations that have it
        for dest in self.settings.destinations:
            if dest.name in done:
                continue
            files = [str(job_dir / f"SEG_{dest.seg_type}.dcm")] + ([str(job_dir / f"SR_{dest.seg_type}.dcm")] if dest.send_sr else [])
            for attempt in range(1, dest.retries + 2):
                started = utcnow()
                try:
                    if dest.protocol == "stow":
                        res = stow(dest.url, files, dest.username, dest.password)
                    else:
                        res = send_items(dest.host, dest.port, dest.ae_title, files,
                                         calling=dest.calling_ae_title or self.settings.scp.ae_title)
                    ok, status = res.ok, "ok" if res.ok else "; ".join(f for _, f in res.failed)
                except Exception as exc:
                    ok, status = False, f"{type(exc).__name__}: {exc}"
                queue.record_delivery(self.db, job_id, dest.name, attempt, ok, "ok" if ok else "failed",
                                      "" if ok else status, started)
                if ok:
                    break
                log.warning("delivery to %s failed (attempt %d): %s", dest.name, attempt, status)
                if attempt <= dest.retries:
                    time.sleep(dest.backoff_seconds * 2 ** (attempt - 1))
            else:
                errors.append(f"{dest.name}: {status}")
        return errors
