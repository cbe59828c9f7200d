"""One job from queued to delivered: load → preprocess/predict/postprocess → encode → send.

Each stage's duration goes into the job's ``timings`` so ``dicom-node jobs`` shows where time went; each
send attempt is a row in ``deliveries``. An exception marks the job for retry (with backoff) or failure,
and never escapes into the scheduler.
"""

from __future__ import annotations

import logging
import time
import traceback

from storage.db import Database
from storage.filestore import FileStore
from storage import queue
from storage.models import utcnow

from .config import Settings
from .rules import stack
from .sender import send_items
from .seg_writer import build_seg
from .volume import load_series

log = logging.getLogger("dicom_node.pipeline")


class Pipeline:
    def __init__(self, settings: Settings, db: Database, store: FileStore, predictor_factory):
        self.settings = settings
        self.db = db
        self.store = store
        self._predictor_factory = predictor_factory
        self._predictor = None

    @property
    def predictor(self):
        """The one loaded model, created on first use and kept for every later job."""
        if self._predictor is None:
            self._predictor = self._predictor_factory()
        return self._predictor

    def run_next(self) -> bool:
        """Run one queued job if there is one; returns whether a job was run."""
        job_id = queue.claim_job(self.db)
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
            self._run(job_id)
        except Exception as exc:  # a job failure must not stop the worker
            err = f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s", job_id, err)
            log.debug("%s", traceback.format_exc())
            state = queue.fail_or_retry(self.db, job_id, err, self.settings.worker.max_attempts)
            log.info("job %s is now %s", job_id, state)

    def _stage(self, job_id: int, name: str, t0: float) -> float:
        now = time.perf_counter()
        queue.add_timing(self.db, job_id, name, now - t0)
        return now

    def _run(self, job_id: int) -> None:
        from storage.models import Job

        with self.db.session() as s:
            job = s.get(Job, job_id)
            series_id = job.series_id
        series, instances = queue.series_instances(self.db, series_id)
        t = time.perf_counter()
        ordered, why = stack(instances)
        if ordered is None:  # cannot happen for a job the rules queued, unless files changed since
            queue.set_state(self.db, job_id, "skipped", reason=why, finished_at=utcnow())
            return
        vol = load_series(ordered)
        t = self._stage(job_id, "load", t)
        predictor = self.predictor
        pred = predictor.predict(vol.array, vol.row_dir, vol.col_dir)
        for stage in ("preprocess", "predict", "postprocess"):
            if stage in pred.timings:
                queue.add_timing(self.db, job_id, stage, pred.timings[stage])
        t = time.perf_counter()
        card = predictor.card
        from inference.postprocess import volumes_cm3

        vols = volumes_cm3(pred.labels, predictor.label_names, vol.voxel_mm3)
        codes = {lab.name: lab.snomed_code for lab in card.labels}
        queue.save_volumes(self.db, job_id, {n: (codes[n], v) for n, v in vols.items()})
        out = self.settings.output
        seg = build_seg(vol.datasets, pred.labels, card, series_description=out.series_description,
                        series_number=out.series_number, manufacturer=out.manufacturer)
        if seg is None:
            queue.set_state(self.db, job_id, "done", reason="no bone structure found; nothing sent",
                            finished_at=utcnow(), model_version=card.version, device=str(predictor.device))
            return
        path = self.store.result_path(series.study.study_uid, f"SEG_{seg.SOPInstanceUID}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path, enforce_file_format=True)
        t = self._stage(job_id, "encode", t)
        queue.set_state(self.db, job_id, "sending", seg_series_uid=seg.SeriesInstanceUID,
                        seg_sop_uid=seg.SOPInstanceUID, seg_path=str(path), model_version=card.version,
                        device=str(predictor.device))
        errors = self._send(job_id, [str(path)])
        self._stage(job_id, "send", t)
        if errors:
            raise RuntimeError("delivery failed: " + "; ".join(errors))
        queue.set_state(self.db, job_id, "done", reason="", finished_at=utcnow())
        log.info("job %s done: %s", job_id, ", ".join(f"{k} {v:.1f} cm3" for k, v in vols.items()))

    def _send(self, job_id: int, files: list[str]) -> list[str]:
        """Send to every destination, retrying each with exponential backoff; returns what still failed."""
        errors = []
        for dest in self.settings.destinations:
            for attempt in range(1, dest.retries + 2):
                started = utcnow()
                try:
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
