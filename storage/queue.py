"""Database operations of the node: recording instances, finding complete series, and the job queue.

Kept in one place so that every state change goes through a few small, tested functions; the SCP handler,
the scheduler and the CLI never write rows themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import Delivery, Instance, Job, Series, StructureVolume, Study, utcnow


@dataclass
class InstanceMeta:
    """Header fields read once at receipt (never the pixel data)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    series_number: int | None = None
    accession_number: str = ""
    study_date: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int = 1
    position: str = ""
    orientation: str = ""
    pixel_spacing: str = ""
    frame_of_reference_uid: str = ""
    image_type: str = ""


_INSTANCE_FIELDS = ("sop_class_uid", "transfer_syntax", "instance_number", "rows", "columns", "frames", "position",
                    "orientation", "pixel_spacing", "frame_of_reference_uid", "image_type")


class Recorder:
    """Records received instances; caches study/series ids so a 1000-slice series costs one insert per slice."""

    def __init__(self, db: Database):
        self.db = db
        self._series_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        se, jb = Series.__table__, Job.__table__
        self._insert = insert(Instance.__table__)
        self._touch = update(se).where(se.c.id == bindparam("sid")).values(
            n_instances=se.c.n_instances + 1, last_received_at=bindparam("now"))
        # A new instance reopens a series that was already judged: it must settle again. A job still queued
        # is withdrawn (it would segment an incomplete series); the next completion makes a new job, so a
        # late instance produces a fresh result rather than being silently ignored.
        self._reopen = update(se).where(se.c.id == bindparam("sid"), se.c.state != "receiving").values(
            state="receiving", completed_at=None)
        self._withdraw = update(jb).where(jb.c.series_id == bindparam("sid"), jb.c.state == "queued").values(
            state="skipped", reason="superseded: more instances arrived before it started", finished_at=bindparam("now"))

    def is_known(self, sop_uid: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Instance.id).where(Instance.sop_uid == sop_uid)) is not None

    def record(self, meta: InstanceMeta, path: str, size: int, calling_aet: str = "") -> bool:
        """Insert the instance; returns False if this SOP Instance UID was already stored."""
        for attempt in range(3):
            try:
                return self._record(meta, path, size, calling_aet)
            except IntegrityError:
                # a concurrent association created the same study/series, or the same instance: look again
                with self._lock:
                    self._series_ids.pop(meta.series_uid, None)
                if self.is_known(meta.sop_uid):
                    return False
                if attempt == 2:
                    raise
        return False

    def _record(self, meta: InstanceMeta, path: str, size: int, calling_aet: str) -> bool:
        # Hot path (every C-STORE): Core statements built once (see __init__), a plain INSERT relying on the
        # unique SOP Instance UID for duplicates, and two UPDATEs without a prior SELECT.
        now = utcnow()
        series_id = self._series_ids.get(meta.series_uid)
        if series_id is None:
            with self.db.session() as s:
                series_id = self._series_id(s, meta)
        row = {f: getattr(meta, f) for f in _INSTANCE_FIELDS}
        row.update(sop_uid=meta.sop_uid, series_id=series_id, path=path, size=size, received_at=now, calling_aet=calling_aet)
        try:
            with self.db.engine.begin() as conn:
                conn.execute(self._insert, row)
                conn.execute(self._touch, {"sid": series_id, "now": now})
                if conn.execute(self._reopen, {"sid": series_id}).rowcount:
                    conn.execute(self._withdraw, {"sid": series_id, "now": now})
        except IntegrityError:
            if self.is_known(meta.sop_uid):
                return False
            raise
        with self._lock:
            self._series_ids[meta.series_uid] = series_id
        return True

    def _series_id(self, s, meta: InstanceMeta) -> int:
        sid = s.scalar(select(Series.id).where(Series.series_uid == meta.series_uid))
        if sid is not None:
            return sid
        study_id = s.scalar(select(Study.id).where(Study.study_uid == meta.study_uid))
        if study_id is None:
            st = Study(study_uid=meta.study_uid, accession_number=meta.accession_number[:16],
                       study_date=meta.study_date[:8], study_description=meta.study_description[:64])
            s.add(st)
            s.flush()
            study_id = st.id
        se = Series(series_uid=meta.series_uid, study_id=study_id, modality=meta.modality[:16],
                    body_part=meta.body_part[:64], series_description=meta.series_description[:64],
                    series_number=meta.series_number)
        s.add(se)
        s.flush()
        return se.id


# ------------------------------------------------------------------------------------------- completion
def stable_series(db: Database, stable_seconds: float) -> list[int]:
    """Series in 'receiving' whose last instance arrived more than ``stable_seconds`` ago."""
    cutoff = utcnow() - dt.timedelta(seconds=stable_seconds)
    with db.session() as s:
        return list(s.scalars(select(Series.id).where(Series.state == "receiving", Series.last_received_at <= cutoff)))


def series_instances(db: Database, series_id: int) -> tuple[Series, list[Instance]]:
    with db.session() as s:
        se = s.get(Series, series_id)
        insts = list(s.scalars(select(Instance).where(Instance.series_id == series_id)))
        _ = se.study  # load for later use outside the session
        return se, insts


def mark_judged(db: Database, series_id: int, *, queue: bool, reason: str, rule: str = "", urgent: bool = False,
                expected_count: int | None = None) -> int | None:
    """Close a complete series: create a queued job, or a skipped one carrying the reason.

    ``expected_count`` guards against an instance that arrived while the rules were evaluated: if the count
    changed, nothing is decided now and the series stays open.
    """
    now = utcnow()
    with db.session() as s:
        q = update(Series).where(Series.id == series_id, Series.state == "receiving")
        if expected_count is not None:
            q = q.where(Series.n_instances == expected_count)
        res = s.execute(q.values(state="queued" if queue else "skipped", completed_at=now))
        if res.rowcount != 1:
            return None
        job = Job(series_id=series_id, state="queued" if queue else "skipped", reason="" if queue else reason,
                  rule=rule, urgent=urgent, created_at=now, finished_at=None if queue else now)
        s.add(job)
        s.flush()
        return job.id


# ------------------------------------------------------------------------------------------- jobs
def claim_job(db: Database) -> int | None:
    """Take the next queued job (urgent first, then oldest) atomically; None when the queue is empty."""
    now = utcnow()
    with db.session() as s:
        candidates = s.scalars(
            select(Job.id).where(Job.state == "queued", (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now))
            .order_by(Job.urgent.desc(), Job.created_at, Job.id).limit(5)
        ).all()
        for jid in candidates:
            res = s.execute(update(Job).where(Job.id == jid, Job.state == "queued").values(
                state="running", started_at=now, attempts=Job.attempts + 1))
            if res.rowcount == 1:
                return jid
    return None


def set_state(db: Database, job_id: int, state: str, **values) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state, **values))


def add_timing(db: Database, job_id: int, stage: str, seconds: float) -> None:
    with db.session() as s:
        job = s.get(Job, job_id)
        t = json.loads(job.timings or "{}")
        t[stage] = round(seconds, 4)
        job.timings = json.dumps(t)


def save_volumes(db: Database, job_id: int, volumes: dict[str, tuple[str, float]]) -> None:
    with db.session() as s:
        for name, (code, cm3) in volumes.items():
            s.add(StructureVolume(job_id=job_id, structure=name, snomed_code=code, volume_cm3=cm3))


def record_delivery(db: Database, job_id: int, destination: str, attempt: int, ok: bool, status: str,
                    error: str, started_at: dt.datetime) -> None:
    with db.session() as s:
        s.add(Delivery(job_id=job_id, destination=destination, attempt=attempt, ok=ok, status=status,
                       error=error, started_at=started_at, finished_at=utcnow()))


def fail_or_retry(db: Database, job_id: int, error: str, max_attempts: int, backoff_seconds: float = 30.0) -> str:
    """After an error: back to the queue with exponential backoff, or failed when attempts are used up."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job.attempts < max_attempts:
            job.state = "queued"
            job.next_attempt_at = utcnow() + dt.timedelta(seconds=backoff_seconds * 2 ** (job.attempts - 1))
        else:
            job.state = "failed"
            job.finished_at = utcnow()
        job.reason = error[:4000]
        return job.state


def requeue_stale_running(db: Database) -> int:
    """At start-up: jobs left 'running'/'sending' by a previous process that died go back to the queue."""
    with db.session() as s:
        res = s.execute(update(Job).where(Job.state.in_(("running", "sending"))).values(
            state="queued", reason="requeued: the node stopped while this job ran"))
        return res.rowcount


def counts(db: Database) -> dict[str, dict[str, int]]:
    with db.session() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        n_inst = s.scalar(select(func.count()).select_from(Instance)) or 0
        n_studies = s.scalar(select(func.count()).select_from(Study)) or 0
    return {"jobs": jobs, "series": series, "totals": {"studies": n_studies, "instances": n_inst}}
