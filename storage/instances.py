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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Table, bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .corrections import kept_series
from .db import Database
from .filestore import UnsafePath, resolve_stored, stored_path
from .models import Instance, Job, Series, Study, utcnow
from .resends import ResendBatch, ResendTimeline
from .states import DuplicatePolicy, EventKind, JobState, Resend, SeriesState
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
    """One stored file waiting to be recorded: its header fields, where it lies, and when it arrived; for a
    re-used SOP Instance UID, what the listener made of it (``path`` is empty when nothing was stored)."""

    meta: InstanceMeta
    path: str
    size: int
    calling_aet: str = ""
    received_at: dt.datetime = field(default_factory=utcnow)
    resend: Resend | None = None


_LENGTHS = {c.name: n for c in Instance.__table__.columns if (n := getattr(c.type, "length", None))}


class Recorder:
    """Records received instances, many in one transaction; caches series ids so a series costs one lookup."""

    def __init__(self, db: Database, on_series: Callable[[set[int]], None] | None = None,
                 policy: DuplicatePolicy = DuplicatePolicy.KEEP,
                 root: str | os.PathLike | None = None):
        self.db = db
        #: what a conflicting re-send the listener did not recognise (its answer already sent) comes to
        self.policy = policy
        #: told (identical, conflicting) re-sends after each committed batch (the listener's counters)
        self.on_resent: Callable[[int, int], None] | None = None
        self.resends = ResendTimeline()
        #: the data folder: paths are stored relative to it (storage/filestore.py); None stores them as given
        self.root = root
        #: told the ids of the series that got new instances, after each committed batch (the completion
        #: check wakes on it instead of waiting for its next scan)
        self.on_series = on_series
        self._series_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        se = cast(Table, Series.__table__)
        self._insert = insert(cast(Table, Instance.__table__))
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
        ins = cast(Table, Instance.__table__)
        # A file re-sent after the retention purge emptied its row's path: the row points at it again.
        self._repath = update(ins).where(ins.c.sop_uid == bindparam("uid"), ins.c.path == "").values(
            path=bindparam("new_path"), size=bindparam("new_size"))
        # A conflicting re-send under DuplicatePolicy.REPLACE: the row describes the newer copy, in its series.
        self._replace = update(ins).where(ins.c.sop_uid == bindparam("uid")).values(
            {f: bindparam(f"v_{f}") for f in ("series_id", "path", "size", "received_at", "calling_aet",
                                              *_INSTANCE_FIELDS)})

    def record(self, meta: InstanceMeta, path: str, size: int, calling_aet: str = "") -> bool:
        """Record one instance now; returns False if this SOP Instance UID was already stored."""
        return self.record_batch([Received(meta, path, size, calling_aet)])[0]

    def record_batch(self, items: list[Received], hold_until: dt.datetime | None = None) -> list[bool]:
        """Record instances in one transaction; for each, whether it was new (False: already stored).

        A re-sent instance lands on the same path and is recorded once. Safe against other writers: a
        concurrent insert of the same study, series or instance makes the transaction fail on a unique
        constraint, and the retry sees the other writer's rows. ``hold_until``: the series these rows touch are
        not judged quiet before then, in the same transaction (rows recorded late, after a database outage,
        carry their old arrival times: committed without the hold, the completion scan could judge their
        series in the moment before it was set).
        """
        for attempt in range(3):
            try:
                return self._record_batch(items, hold_until)
            except IntegrityError:
                with self._lock:
                    for it in items:
                        self._series_ids.pop(it.meta.series_uid, None)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record_batch(self, items: list[Received], hold_until: dt.datetime | None = None) -> list[bool]:
        resent = ResendBatch()
        with self.db.session() as s:
            sids: dict[str, int] = {}  # series ids of this batch (a series row is made only for a stored instance)
            uids = list({it.meta.sop_uid for it in items})
            known = {u: (path, sid) for u, path, sid in s.execute(
                select(Instance.sop_uid, Instance.path, Instance.series_id).where(Instance.sop_uid.in_(uids)))}
            fresh: list[bool] = []
            rows: list[dict] = []
            replaced: list[dict] = []
            touched: dict[int, list] = {}  # series id -> [count, latest arrival]

            def touch(sid: int, k: int, at: dt.datetime) -> None:
                t = touched.setdefault(sid, [0, at])
                t[0] += k
                t[1] = max(t[1], at)

            for it in items:
                m = it.meta
                prior = known.get(m.sop_uid)
                fresh.append(prior is None and it.resend is not Resend.KEPT_FIRST)
                if prior is None:
                    if it.resend is Resend.KEPT_FIRST:  # the first copy's row was refused: nothing stored now either
                        continue
                    sid = self._sid(s, sids, m)
                    row = {f: _fit(f, getattr(m, f)) for f in _INSTANCE_FIELDS}
                    row.update(sop_uid=m.sop_uid, series_id=sid, path=self._stored(it.path), size=it.size,
                               received_at=it.received_at, calling_aet=it.calling_aet[:16])
                    rows.append(row)
                    known[m.sop_uid] = (self._stored(it.path), sid)
                    touch(sid, 1, it.received_at)
                    continue
                first_path, first_sid = prior
                if first_path == "" and it.path and it.resend is not Resend.KEPT_FIRST:
                    s.execute(self._repath, {"uid": m.sop_uid, "new_path": self._stored(it.path),
                                             "new_size": it.size})
                    known[m.sop_uid] = (self._stored(it.path), first_sid)
                    continue
                target = self._existing_sid(s, sids, m)
                if it.resend is Resend.IDENTICAL or (it.resend is None and target == first_sid):
                    self.resends.identical(resent, first_sid, it.received_at, it.calling_aet)
                    continue
                answered = it.resend is not None
                replace = it.resend is Resend.REPLACED or (not answered and self.policy is DuplicatePolicy.REPLACE)
                if not replace:
                    self.resends.conflict(s, resent, sop_uid=m.sop_uid, first_series=first_sid, target_series=target,
                                          calling_aet=it.calling_aet, replaced=False, answered=answered)
                    if not answered and it.path:  # stored and acknowledged before the conflict was known
                        resent.remove.append(it.path)
                    continue
                sid = target if target is not None else self._sid(s, sids, m)  # the newer copy's series
                self.resends.conflict(s, resent, sop_uid=m.sop_uid, first_series=first_sid, target_series=sid,
                                      calling_aet=it.calling_aet, replaced=True, answered=answered)
                values = {f"v_{f}": _fit(f, getattr(m, f)) for f in _INSTANCE_FIELDS}
                values.update(uid=m.sop_uid, v_series_id=sid, v_path=self._stored(it.path), v_size=it.size,
                              v_received_at=it.received_at, v_calling_aet=it.calling_aet[:16])
                replaced.append(values)
                known[m.sop_uid] = (self._stored(it.path), sid)
                touch(sid, 0 if sid == first_sid else 1, it.received_at)  # reopened: its content changed
                if sid != first_sid:
                    touch(first_sid, -1, it.received_at)
                    first_file = self._located(first_path)
                    if first_file:
                        resent.remove.append(first_file)
            if rows:
                s.execute(self._insert, rows)
            for values in replaced:  # after the inserts: the first copy may be in this batch
                s.execute(self._replace, values)
            for sid, (k, last) in touched.items():
                s.execute(self._touch, {"sid": sid, "k": k, "now": last})
            if hold_until is not None and touched:
                s.execute(update(Series).where(Series.id.in_(list(touched)), Series.state == SeriesState.RECEIVING)
                          .values(quiet_until=case((Series.quiet_until > hold_until, Series.quiet_until),
                                                   else_=hold_until)))
            self.resends.write(s, resent)
        with self._lock:
            self._series_ids.update(sids)
        self.resends.committed(resent)
        n_identical = sum(t[0] for t in resent.identical.values())
        if (n_identical or resent.conflicts) and self.on_resent is not None:
            try:
                self.on_resent(n_identical, resent.conflicts)
            except Exception:  # a counter must never fail a recording
                log.exception("on_resent callback failed")
        if touched and self.on_series is not None:
            try:
                self.on_series(set(touched))
            except Exception:  # the completion check's wake-up must never fail a recording
                log.exception("on_series callback failed")
        return fresh

    def _sid(self, s, sids: dict[str, int], meta: InstanceMeta) -> int:
        """The series' id (cached), made with its study row if it has none yet."""
        sid = self._existing_sid(s, sids, meta)
        if sid is None:
            sid = sids[meta.series_uid] = self._series_id(s, meta)
        return sid

    def _existing_sid(self, s, sids: dict[str, int], meta: InstanceMeta) -> int | None:
        """The series' id if it has a row (cached), without making one."""
        uid = meta.series_uid
        sid = sids.get(uid)
        if sid is None:
            sid = self._series_ids.get(uid)
        if sid is None:
            sid = s.scalar(select(Series.id).where(Series.series_uid == uid))
        if sid is not None:
            sids[uid] = sid
        return sid

    def _stored(self, path: str) -> str:
        return path if self.root is None else stored_path(self.root, path)

    def _located(self, stored: str) -> str | None:
        """The file a stored path names under the current data folder; None for none, or one that would lead
        outside it (never removed)."""
        if not stored:
            return None
        if self.root is None:
            return stored
        try:
            return str(resolve_stored(self.root, stored))
        except (UnsafePath, FileNotFoundError):
            return None

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
    (``root``: the data folder the stored paths are relative to). Series with a CORRECTED correction are
    kept: their images are training data (storage/corrections.py) until an admin deletes the correction."""
    cutoff = utcnow() - dt.timedelta(hours=hours)
    removed = 0
    with db.session() as s:
        newest = select(Job.series_id, func.max(Job.id).label("jid")).group_by(Job.series_id).subquery()
        rows = s.execute(select(Job.series_id).join(newest, newest.c.jid == Job.id).where(
            Job.state == JobState.DONE, Job.finished_at < cutoff, Job.series_id.not_in(kept_series()))).scalars().all()
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
