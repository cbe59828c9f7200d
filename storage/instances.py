"""Received instances in the database: the header fields read at receipt, the Recorder that writes them
(study, series and instance rows, many in one transaction), and the retention purge that empties their paths.

Why here and not in the receive stage: the Recorder needs ``InstanceMeta`` and ``Received``, and storage is
the lower layer (it never imports ``dicom_node``), so the receive stage imports these plain dataclasses from
storage rather than the other way round.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .filestore import resolve_stored, stored_path
from .models import Instance, Job, Series, Study, utcnow
from .states import EventKind, JobState, SeriesState
from .timeline import add_event

log = logging.getLogger("storage.instances")

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
    images_in_acquisition: int | None = None  # (0020,1002): how many images the scanner says it made
    acquisition_number: int | None = None


def _fit(field_name: str, value):
    """Header text cut to its column's length (PostgreSQL refuses longer values; an over-long Image Type
    must not make a whole batch of rows fail)."""
    limit = _LENGTHS.get(field_name)
    return value[:limit] if limit and isinstance(value, str) else value


_INSTANCE_FIELDS = ("sop_class_uid", "transfer_syntax", "instance_number", "rows", "columns", "frames", "position",
                    "orientation", "pixel_spacing", "frame_of_reference_uid", "image_type", "images_in_acquisition",
                    "acquisition_number")


@dataclass
class Received:
    """One stored file waiting to be recorded: its header fields, where it lies, and when it arrived."""

    meta: InstanceMeta
    path: str
    size: int
    calling_aet: str = ""
    received_at: dt.datetime = field(default_factory=utcnow)


_LENGTHS = {c.name: c.type.length for c in Instance.__table__.columns if getattr(c.type, "length", None)}


class Recorder:
    """Records received instances, many in one transaction; caches series ids so a series costs one lookup."""

    def __init__(self, db: Database, on_series: Callable[[set[int]], None] | None = None,
                 root: str | os.PathLike | None = None):
        self.db = db
        #: the data folder: paths are stored relative to it (storage/filestore.py); None stores them as given
        self.root = root
        #: told the ids of the series that got new instances, after each committed batch (the completion
        #: check wakes on it instead of waiting for its next scan)
        self.on_series = on_series
        self._series_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        se = Series.__table__
        self._insert = insert(Instance.__table__)
        # One UPDATE per series and batch: count, time, and (re)open the series. A new instance reopens a
        # series that was already judged: it must settle again, and the next completion makes a new job, so a
        # late instance produces a fresh result rather than being silently ignored. A job still queued for the
        # series is withdrawn when a worker would claim it, or when the next job is made (claim_job,
        # mark_judged): that keeps a second statement off the ingest path.
        self._touch = update(se).where(se.c.id == bindparam("sid")).values(
            n_instances=se.c.n_instances + bindparam("k"), state=SeriesState.RECEIVING, completed_at=None,
            # never backwards: start-up recovery records files with their (older) modification times
            last_received_at=case((se.c.last_received_at > bindparam("now"), se.c.last_received_at),
                                  else_=bindparam("now")))
        ins = Instance.__table__
        # A file re-sent after the retention purge emptied its row's path: the row points at it again.
        self._repath = update(ins).where(ins.c.sop_uid == bindparam("uid"), ins.c.path == "").values(
            path=bindparam("new_path"), size=bindparam("new_size"))

    def record(self, meta: InstanceMeta, path: str, size: int, calling_aet: str = "") -> bool:
        """Record one instance now; returns False if this SOP Instance UID was already stored."""
        return self.record_batch([Received(meta, path, size, calling_aet)])[0]

    def record_batch(self, items: list[Received]) -> list[bool]:
        """Record instances in one transaction; for each, whether it was new (False: already stored).

        A re-sent instance lands on the same path and is recorded once. Safe against other writers: a
        concurrent insert of the same study, series or instance makes the transaction fail on a unique
        constraint, and the retry sees the other writer's rows.
        """
        for attempt in range(3):
            try:
                return self._record_batch(items)
            except IntegrityError:
                with self._lock:
                    for it in items:
                        self._series_ids.pop(it.meta.series_uid, None)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record_batch(self, items: list[Received]) -> list[bool]:
        with self.db.session() as s:
            sids: dict[str, int] = {}
            for it in items:
                uid = it.meta.series_uid
                if uid not in sids:
                    sid = self._series_ids.get(uid)
                    sids[uid] = sid if sid is not None else self._series_id(s, it.meta)
            uids = list({it.meta.sop_uid for it in items})
            known = {u: path for u, path in s.execute(
                select(Instance.sop_uid, Instance.path).where(Instance.sop_uid.in_(uids)))}
            seen = set(known)
            fresh: list[bool] = []
            rows: list[dict] = []
            touched: dict[int, list] = {}  # series id -> [count, latest arrival]
            for it in items:
                m = it.meta
                new = m.sop_uid not in seen
                fresh.append(new)
                if not new:
                    if known.get(m.sop_uid) == "":
                        s.execute(self._repath, {"uid": m.sop_uid, "new_path": self._stored(it.path),
                                                 "new_size": it.size})
                        known[m.sop_uid] = self._stored(it.path)
                    continue
                seen.add(m.sop_uid)
                sid = sids[m.series_uid]
                row = {f: _fit(f, getattr(m, f)) for f in _INSTANCE_FIELDS}
                row.update(sop_uid=m.sop_uid, series_id=sid, path=self._stored(it.path), size=it.size,
                           received_at=it.received_at, calling_aet=it.calling_aet[:16])
                rows.append(row)
                t = touched.setdefault(sid, [0, it.received_at])
                t[0] += 1
                t[1] = max(t[1], it.received_at)
            if rows:
                s.execute(self._insert, rows)
                for sid, (k, last) in touched.items():
                    s.execute(self._touch, {"sid": sid, "k": k, "now": last})
        with self._lock:
            self._series_ids.update(sids)
        if touched and self.on_series is not None:
            try:
                self.on_series(set(touched))
            except Exception:  # the completion check's wake-up must never fail a recording
                log.exception("on_series callback failed")
        return fresh

    def _stored(self, path: str) -> str:
        return path if self.root is None else stored_path(self.root, path)

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
        add_event(s, EventKind.RECEIVED, series_id=se.id, study_id=study_id, detail="first instance")
        return se.id


def purge_delivered_images(db: Database, hours: float, root: str | os.PathLike) -> int:
    """Delete stored instance files of series whose newest job was delivered more than ``hours`` ago
    (``root``: the data folder the stored paths are relative to)."""
    cutoff = utcnow() - dt.timedelta(hours=hours)
    removed = 0
    with db.session() as s:
        newest = select(Job.series_id, func.max(Job.id).label("jid")).group_by(Job.series_id).subquery()
        rows = s.execute(select(Job.series_id).join(newest, newest.c.jid == Job.id).where(
            Job.state == JobState.DONE, Job.finished_at < cutoff)).scalars().all()
        for series_id in rows:
            insts = s.scalars(select(Instance).where(Instance.series_id == series_id, Instance.path != "")).all()
            for inst in insts:
                try:
                    os.remove(resolve_stored(root, inst.path))
                except FileNotFoundError:
                    pass
                except ValueError as exc:  # UnsafePath: nothing of ours to remove
                    log.warning("instance %s not removed: %s", inst.id, exc)
                inst.path = ""
                removed += 1
            if insts:
                add_event(s, EventKind.PURGED, series_id=series_id, detail=f"{len(insts)} images removed (retention)")
    return removed
