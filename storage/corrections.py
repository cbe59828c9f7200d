"""Corrections (table ``corrections``): recording them, finding what they correct, listing and deleting them.

Why here and not in learn/: the retention purge (storage/instances.py) must know which series a correction
keeps, the dashboard and the learning rounds read the rows, and the intake (learn/intake.py) writes them;
all of them reach the table through these queries. A correction is unique by its SOP Instance UID, so a
series judged again after more instances arrived records each instance once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .db import Database
from .filestore import resolve_stored, stored_path
from .models import Correction, Instance, Job, Series, Study, utcnow
from .states import AuditOutcome, CorrectionState, EventKind, JobState, SeriesState
from .timeline import add_audit, add_event

log = logging.getLogger("storage.corrections")


def labels_file(root: str | os.PathLike, correction_id: int) -> Path:
    """corrections/<id>.npz under the data folder: named by the row id, never by a received value."""
    return Path(root) / "corrections" / f"{int(correction_id)}.npz"


def is_own_result(db: Database, sop_uid: str) -> bool:
    """Whether ``sop_uid`` is a SEG the node itself made (any job's, superseded or not)."""
    with db.session() as s:
        return s.scalar(select(Job.id).where(Job.seg_sop_uid == sop_uid).limit(1)) is not None


def known(db: Database, sop_uid: str) -> int | None:
    """The id of the correction recorded for ``sop_uid``, if any."""
    with db.session() as s:
        return s.scalar(select(Correction.id).where(Correction.sop_uid == sop_uid))


def recorded_state(db: Database, sop_uid: str) -> tuple[str, str] | None:
    """(state, reason) of the correction recorded for ``sop_uid``, if any."""
    with db.session() as s:
        row = s.execute(select(Correction.state, Correction.reason).where(Correction.sop_uid == sop_uid)).first()
        return None if row is None else (row[0], row[1])


def find_source_series(db: Database, series_uids: list[str], sop_uids: list[str],
                       frame_of_reference_uid: str) -> int | None:
    """The held series a SEG refers to: by its Referenced Series Sequence, else by the source instances its
    frames reference; only a series with an image in the SEG's Frame of Reference counts."""
    with db.session() as s:
        ids: list[int] = []
        if series_uids:
            ids += list(s.scalars(select(Series.id).where(Series.series_uid.in_(series_uids[:1000]))))
        if sop_uids:
            ids += list(s.scalars(select(Instance.series_id).where(Instance.sop_uid.in_(sop_uids[:1000])).distinct()))
        for sid in dict.fromkeys(ids):
            if s.scalar(select(Instance.id).where(Instance.series_id == sid,
                                                  Instance.frame_of_reference_uid == frame_of_reference_uid)
                        .limit(1)) is not None:
                return sid
    return None


@dataclass
class SegmentedJob:
    id: int
    seg_path: str
    seg_sop_uid: str
    model_version: str


def segmented_job(db: Database, series_id: int) -> SegmentedJob | None:
    """The newest job of the series that was not superseded and left a SEG: the result a correction edits."""
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.series_id == series_id, Job.superseded_by.is_(None),
                                          Job.seg_path != "").order_by(Job.id.desc()).limit(1)).first()
        return None if job is None else SegmentedJob(job.id, job.seg_path, job.seg_sop_uid, job.model_version)


def pending_result(db: Database, series_id: int) -> str | None:
    """Why the series has no result yet but may still get one (its newest job is queued or running, or the
    series has not been judged yet), in words; None when no result is coming."""
    with db.session() as s:
        series = s.get(Series, series_id)
        if series is None:
            return None
        job = s.scalars(select(Job).where(Job.series_id == series_id, Job.superseded_by.is_(None))
                        .order_by(Job.id.desc()).limit(1)).first()
        if job is not None:
            if job.state in (JobState.QUEUED, JobState.RUNNING) and not job.seg_path:
                return f"the node's result for the referenced series is not ready yet (job {job.id} is {job.state})"
            return None
        if series.state in (SeriesState.RECEIVING, SeriesState.COMPLETE, SeriesState.QUEUED):
            return "the referenced series is still being received; the node has not segmented it yet"
        return None


def waiting_corrections(db: Database, limit: int = 100) -> list[tuple[int, int | None, int | None]]:
    """(correction id, instance id, source series id) of the corrections waiting for their series' result,
    oldest first."""
    with db.session() as s:
        return [(r[0], r[1], r[2]) for r in s.execute(
            select(Correction.id, Correction.instance_id, Correction.series_id)
            .where(Correction.state == CorrectionState.WAITING).order_by(Correction.id).limit(limit))]


def series_skipped_as(db: Database, reason: str) -> list[int]:
    """Series with a job skipped with exactly this reason, oldest first: the series of Segmentation objects a
    stop left before the intake had read them (read again at the start; reading one twice changes nothing)."""
    with db.session() as s:
        rows = s.execute(select(Job.series_id, func.min(Job.id)).where(Job.state == JobState.SKIPPED,
                                                                       Job.reason == reason)
                         .group_by(Job.series_id).order_by(func.min(Job.id)))
        return [r[0] for r in rows]


def reword_seg_series(db: Database, series_id: int, reason: str) -> None:
    """The skip reason of a series of Segmentation objects, once the intake has read it or a waiting correction
    in it is settled (until then it said "being read" or "waiting" on the dashboard and in ``dicom-node jobs``)."""
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.series_id == series_id, Job.state == JobState.SKIPPED)
                        .order_by(Job.id.desc()).limit(1)).first()
        if job is not None and job.reason != reason:
            job.reason = reason[:4000]


def record(db: Database, *, sop_uid: str, state: str, reason: str = "", event_detail: str = "",
           **fields) -> tuple[int, bool]:
    """Insert the correction (``fields``: the other columns) with a CORRECTION event on its source series'
    timeline; (id, True), or (the existing id, False) when that SOP Instance UID is already recorded.

    A row still WAITING for its series' result is taken up instead (same id, its received time kept): what it
    turned out to be replaces the wait, and the timeline says so."""
    existing = known(db, sop_uid)
    if existing is not None:
        with db.session() as s:
            row = s.get(Correction, existing)
            if row is None or row.state != CorrectionState.WAITING or state == CorrectionState.WAITING:
                return existing, False
            row.state, row.reason = state, reason[:4000]
            for key, value in fields.items():
                setattr(row, key, value)
            if row.series_id is not None:
                add_event(s, EventKind.CORRECTION, series_id=row.series_id, job_id=row.job_id,
                          detail=f"correction {row.id}: {event_detail or state}")
            return row.id, True
    try:
        with db.session() as s:
            row = Correction(sop_uid=sop_uid, state=state, reason=reason[:4000], received_at=utcnow(), **fields)
            s.add(row)
            s.flush()
            if row.series_id is not None:
                add_event(s, EventKind.CORRECTION, series_id=row.series_id, job_id=row.job_id,
                          detail=f"correction {row.id}: {event_detail or state}")
            return row.id, True
    except IntegrityError:  # recorded meanwhile by another check
        again = known(db, sop_uid)
        if again is None:
            raise
        return again, False


def set_result(db: Database, correction_id: int, *, state: str, reason: str = "", labels_path: str = "",
               metrics: dict | None = None, mean_dice: float | None = None) -> None:
    """The outcome of reading and scoring a recorded correction."""
    with db.session() as s:
        row = s.get(Correction, correction_id)
        if row is None:
            return
        row.state, row.reason, row.labels_path = state, reason[:4000], labels_path
        row.metrics = json.dumps(metrics or {}, sort_keys=True)
        row.mean_dice = mean_dice


def _row(c: Correction, series: Series | None, study: Study | None) -> dict:
    return {
        "id": c.id, "state": c.state, "reason": c.reason, "sop_class_uid": c.sop_class_uid,
        "study_uid": study.study_uid if study else "", "series_uid": series.series_uid if series else "",
        "seg_series_uid": c.seg_series_uid, "series_id": c.series_id, "job": c.job_id,
        "model_version": c.model_version, "creator": c.creator, "station": c.station, "calling_ae": c.calling_ae,
        "content_at": c.content_at.isoformat(timespec="seconds") if c.content_at else None,
        "received_at": c.received_at.isoformat(timespec="seconds") if c.received_at else None,
        "labels_path": c.labels_path, "metrics": json.loads(c.metrics or "{}"), "mean_dice": c.mean_dice,
        "holdout": c.holdout,
    }


def list_corrections(db: Database, limit: int = 200, state: str | None = None) -> list[dict]:
    """The newest corrections first, as plain dicts (the CLI's and dashboard's rows)."""
    with db.session() as s:
        q = (select(Correction, Series, Study).outerjoin(Series, Series.id == Correction.series_id)
             .outerjoin(Study, Study.id == Series.study_id).order_by(Correction.id.desc()).limit(limit))
        if state:
            q = q.where(Correction.state == state)
        return [_row(c, se, st) for c, se, st in s.execute(q)]


def get_correction(db: Database, correction_id: int) -> dict | None:
    with db.session() as s:
        row = s.execute(select(Correction, Series, Study).outerjoin(Series, Series.id == Correction.series_id)
                        .outerjoin(Study, Study.id == Series.study_id).where(Correction.id == correction_id)).first()
        return None if row is None else _row(*row)


def delete_correction(db: Database, correction_id: int, root: str | os.PathLike, actor: str,
                      address: str = "") -> str:
    """An admin deletes a correction: its label file goes, its state becomes DELETED (the row stays, with who
    and when in the audit log), and its source images are left to the retention purge again. Returns what
    happened, in words."""
    with db.session() as s:
        row = s.get(Correction, correction_id)
        if row is None:
            add_audit(s, actor, address, "delete-correction", None, AuditOutcome.REFUSED,
                      f"correction {correction_id} does not exist")
            return f"no correction {correction_id}"
        if row.labels_path:
            try:
                os.remove(resolve_stored(root, row.labels_path))
            except FileNotFoundError:
                pass
            except ValueError as exc:  # UnsafePath: nothing of ours to remove
                log.warning("correction %s: label file not removed: %s", correction_id, exc)
        was = row.state
        row.state, row.labels_path = CorrectionState.DELETED, ""
        add_audit(s, actor, address, "delete-correction", row.job_id, AuditOutcome.DONE,
                  f"correction {correction_id} ({was}) deleted")
        if row.series_id is not None:
            add_event(s, EventKind.CORRECTION, series_id=row.series_id, job_id=row.job_id,
                      detail=f"correction {correction_id} deleted by an admin")
        return f"correction {correction_id} deleted (was {was})"


def kept_series():
    """A select of the series whose images a CORRECTED correction keeps as training data (for the purge)."""
    return select(Correction.series_id).where(Correction.state == CorrectionState.CORRECTED,
                                              Correction.series_id.is_not(None))


def relative_labels_path(root: str | os.PathLike, path: Path) -> str:
    return stored_path(root, path)


def content_time(date: str, time: str) -> dt.datetime | None:
    """Content Date + Content Time as a datetime, or None when absent or malformed."""
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    t = (time or "").strip().split(".")[0].ljust(6, "0")[:6]
    try:
        return dt.datetime.strptime(date + (t if t.isdigit() else "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
