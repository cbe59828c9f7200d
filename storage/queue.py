"""Database operations of the node: recording instances, finding complete series, and the job queue.

Kept in one place so that every state change goes through a few small, tested functions; the SCP handler,
the scheduler and the CLI never write rows themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import AuditEntry, Event, Instance, Job, QualityCheck, Series, StructureVolume, Study, utcnow


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
                    "orientation", "pixel_spacing", "frame_of_reference_uid", "image_type", "images_in_acquisition", "acquisition_number")


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

    def __init__(self, db: Database, on_series: Callable[[set[int]], None] | None = None):
        self.db = db
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
            n_instances=se.c.n_instances + bindparam("k"), state="receiving", completed_at=None,
            # never backwards: start-up recovery records files with their (older) modification times
            last_received_at=case((se.c.last_received_at > bindparam("now"), se.c.last_received_at),
                                  else_=bindparam("now")))
        ins = Instance.__table__
        # A file re-sent after the retention purge emptied its row's path: the row points at it again.
        self._repath = update(ins).where(ins.c.sop_uid == bindparam("uid"), ins.c.path == "").values(
            path=bindparam("new_path"), size=bindparam("new_size"))

    def is_known(self, sop_uid: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Instance.id).where(Instance.sop_uid == sop_uid)) is not None

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
                        s.execute(self._repath, {"uid": m.sop_uid, "new_path": it.path, "new_size": it.size})
                        known[m.sop_uid] = it.path
                    continue
                seen.add(m.sop_uid)
                sid = sids[m.series_uid]
                row = {f: _fit(f, getattr(m, f)) for f in _INSTANCE_FIELDS}
                row.update(sop_uid=m.sop_uid, series_id=sid, path=it.path, size=it.size, received_at=it.received_at,
                           calling_aet=it.calling_aet[:16])
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
                logging.getLogger("storage.queue").exception("on_series callback failed")
        return fresh

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
        add_event(s, "received", series_id=se.id, study_id=study_id, detail="first instance")
        return se.id


# ------------------------------------------------------------------------------------------- completion
def stable_series(db: Database, stable_seconds: float) -> list[int]:
    """Series in 'receiving' whose last instance arrived more than ``stable_seconds`` ago, and whose quiet
    period was not extended beyond now (an aborted association or an unclean stop: see ``extend_quiet``)."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    with db.session() as s:
        return list(s.scalars(select(Series.id).where(
            Series.state == "receiving", Series.last_received_at <= cutoff,
            Series.quiet_until.is_(None) | (Series.quiet_until <= now))))


def receiving_series(db: Database) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Series.id).where(Series.state == "receiving")))


@dataclass
class CompletionView:
    """What the completion check needs of one series: its row and a summary of its instances' headers."""

    series_id: int
    state: str
    study_uid: str
    series_uid: str
    n_instances: int
    expected_count: int | None
    expected_from: str
    expected_held: int | None
    fetch_attempts: int
    calling_aets: tuple[str, ...]
    #: Images in Acquisition: (lowest, highest, how many instances carry it); Acquisition Number: (lowest, highest)
    images_in_acquisition: tuple[int | None, int | None, int]
    acquisition_numbers: tuple[int | None, int | None]
    multiframe: int  # instances with more than one frame (an Enhanced MR object is a whole series)


def completion_view(db: Database, series_id: int, with_instances: bool = True) -> CompletionView | None:
    """The series row, and (``with_instances``) one aggregate over its instances (no row is loaded)."""
    with db.session() as s:
        row = s.execute(select(Series.id, Series.state, Study.study_uid, Series.series_uid, Series.n_instances,
                               Series.expected_count, Series.expected_from, Series.expected_held,
                               Series.fetch_attempts).join(Study, Study.id == Series.study_id)
                        .where(Series.id == series_id)).first()
        if row is None:
            return None
        agg = (None, None, 0, None, None, 0, "", "")
        if with_instances:
            i = Instance
            agg = s.execute(select(func.min(i.images_in_acquisition), func.max(i.images_in_acquisition),
                                   func.count(i.images_in_acquisition), func.min(i.acquisition_number),
                                   func.max(i.acquisition_number), func.sum(case((i.frames > 1, 1), else_=0)),
                                   func.min(i.calling_aet), func.max(i.calling_aet))
                            .where(i.series_id == series_id)).one()
    aets = tuple(sorted({a for a in agg[6:8] if a}))
    return CompletionView(*row, calling_aets=aets, images_in_acquisition=(agg[0], agg[1], agg[2] or 0),
                          acquisition_numbers=(agg[3], agg[4]), multiframe=int(agg[5] or 0))


def set_expected(db: Database, series_id: int, count: int | None, source: str, held: int, detail: str) -> bool:
    """Record what a source said the series holds, and how many the node held when it asked; the timeline
    gets an event when the answer differs from the last one. Returns whether it differed."""
    with db.session() as s:
        se = s.get(Series, series_id)
        if se is None:
            return False
        changed = (se.expected_count, se.expected_from) != (count, source)
        se.expected_count, se.expected_from, se.expected_held = count, source[:64], held
        if changed:
            add_event(s, "expected", series_id=series_id, detail=detail)
        return changed


def count_fetch(db: Database, series_id: int, detail: str) -> int:
    """One more attempt to fetch missing instances (on the timeline); returns the attempt's number."""
    with db.session() as s:
        s.execute(update(Series).where(Series.id == series_id).values(fetch_attempts=Series.fetch_attempts + 1))
        n = s.scalar(select(Series.fetch_attempts).where(Series.id == series_id)) or 0
        add_event(s, "fetch", series_id=series_id, detail=f"attempt {n}: {detail}")
        return n


def held_sop_uids(db: Database, series_id: int) -> set[str]:
    with db.session() as s:
        return set(s.scalars(select(Instance.sop_uid).where(Instance.series_id == series_id)))


def extend_quiet(db: Database, until: dt.datetime, reason: str, series_uids: list[str] | None = None,
                 series_ids: list[int] | None = None) -> dict[int, str]:
    """Keep series that are still receiving from being judged quiet before ``until`` (those named by UID or
    id), with the reason on their timelines; returns their ids and UIDs."""
    if not series_uids and not series_ids:
        return {}
    with db.session() as s:
        q = select(Series.id, Series.series_uid).where(Series.state == "receiving")
        if series_uids is not None:
            q = q.where(Series.series_uid.in_(series_uids))
        if series_ids is not None:
            q = q.where(Series.id.in_(series_ids))
        found = dict(s.execute(q).all())
        for sid in found:
            s.execute(update(Series).where(Series.id == sid).values(
                quiet_until=case((Series.quiet_until > until, Series.quiet_until), else_=until)))
            add_event(s, "wait", series_id=sid, detail=reason)
        return found


def end_quiet(db: Database, series_uids: list[str], reason: str) -> int:
    """The resend that an extended quiet period waited for has arrived (its association ended with a
    release): the series settle on ``stable_seconds`` again. Returns how many were waiting."""
    with db.session() as s:
        ids = list(s.scalars(select(Series.id).where(Series.series_uid.in_(series_uids),
                                                     Series.quiet_until.is_not(None))))
        for sid in ids:
            s.execute(update(Series).where(Series.id == sid).values(quiet_until=None))
            add_event(s, "resent", series_id=sid, detail=reason)
        return len(ids)


def series_instances(db: Database, series_id: int) -> tuple[Series, list[Instance]]:
    with db.session() as s:
        se = s.get(Series, series_id)
        insts = list(s.scalars(select(Instance).where(Instance.series_id == series_id)))
        _ = se.study  # load for later use outside the session
        return se, insts


def add_event(s, kind: str, *, series_id: int | None = None, job_id: int | None = None, study_id: int | None = None,
              detail: str = "", at: dt.datetime | None = None) -> None:
    """Append one timeline event (inside the caller's transaction, so state and event agree)."""
    if study_id is None and series_id is not None:
        study_id = s.scalar(select(Series.study_id).where(Series.id == series_id))
    s.add(Event(kind=kind, study_id=study_id, series_id=series_id, job_id=job_id, detail=detail[:2000], at=at or utcnow()))


def event(db: Database, kind: str, **kw) -> None:
    with db.session() as s:
        add_event(s, kind, **kw)


def mark_judged(db: Database, series_id: int, *, queue: bool, reason: str, rule: str = "", urgent: bool = False,
                expected_count: int | None = None, how: str = "") -> int | None:
    """Close a complete series: create a queued job, or a skipped one carrying the reason; ``how`` says on
    the timeline what made it complete (the PACS's count, the images' own count, the quiet timer).

    ``expected_count`` guards against an instance that arrived while the rules were evaluated: if the count
    changed, nothing is decided now and the series stays open. A job that already produced (or is producing)
    a result for this series is marked superseded by the new one.
    """
    now = utcnow()
    with db.session() as s:
        q = update(Series).where(Series.id == series_id, Series.state == "receiving")
        if expected_count is not None:
            q = q.where(Series.n_instances == expected_count)
        res = s.execute(q.values(state="queued" if queue else "skipped", completed_at=now))
        if res.rowcount != 1:
            return None
        _withdraw_queued(s, series_id, now)
        job = Job(series_id=series_id, state="queued" if queue else "skipped", reason="" if queue else reason,
                  rule=rule, urgent=urgent, created_at=now, finished_at=None if queue else now,
                  n_instances=expected_count)
        s.add(job)
        s.flush()
        detail = "; ".join(x for x in (f"{expected_count} instances" if expected_count else "", how) if x)
        add_event(s, "complete", series_id=series_id, job_id=job.id, detail=detail, at=now)
        add_event(s, "queued" if queue else "skipped", series_id=series_id, job_id=job.id,
                  detail=" ".join(x for x in ("urgent" if urgent else "", reason) if x) if queue else reason, at=now)
        if queue:
            older = s.scalars(select(Job).where(Job.series_id == series_id, Job.id != job.id, Job.superseded_by.is_(None),
                                                Job.state.in_(("running", "delivering", "sending", "review", "done")))).all()
            for old in older:
                old.superseded_by = job.id
                add_event(s, "superseded", series_id=series_id, job_id=old.id,
                          detail=f"later instances arrived; job {job.id} makes a new result")
        return job.id


WITHDRAWN = "superseded: more instances arrived before it started"


def _withdraw_queued(s, series_id: int, now: dt.datetime, job_id: int | None = None) -> None:
    """Jobs still queued for a series that received more instances: they would segment an old, incomplete
    set of slices; skipped with the reason (the series' next completion makes a new job)."""
    q = select(Job.id).where(Job.series_id == series_id, Job.state == "queued")
    if job_id is not None:
        q = q.where(Job.id == job_id)
    for jid in s.scalars(q).all():
        res = s.execute(update(Job).where(Job.id == jid, Job.state == "queued").values(
            state="skipped", reason=WITHDRAWN, finished_at=now))
        if res.rowcount:
            add_event(s, "skipped", series_id=series_id, job_id=jid, detail=WITHDRAWN, at=now)


# ------------------------------------------------------------------------------------------- jobs
def claim_job(db: Database, owner: str = "", lease_seconds: float = 60.0, max_attempts: int = 3) -> int | None:
    """Take the next due job atomically: urgent first, then oldest; None when nothing is due.

    Due means queued (and past its backoff), or running/sending with an expired lease (its worker died).
    On PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so concurrent workers never
    wait for or take the same job; on SQLite the single writer serialises the compare-and-set update.
    """
    now = utcnow()
    due = ((Job.state == "queued") & (Job.next_attempt_at.is_(None) | (Job.next_attempt_at <= now))) | (
        Job.state.in_(("running", "sending")) & (Job.lease_expires_at < now))
    q = select(Job.id, Job.state, Job.attempts, Job.series_id, Series.state).join(Series, Series.id == Job.series_id) \
        .where(due).order_by(Job.urgent.desc(), Job.created_at, Job.id).limit(1)
    if db.engine.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Job)
    for _ in range(20):
        with db.session() as s:
            row = s.execute(q).first()
            if row is None:
                return None
            jid, state, attempts, series_id, series_state = row
            if state == "queued" and series_state == "receiving":  # more instances came after it was queued
                _withdraw_queued(s, series_id, now, jid)
                continue
            if state != "queued" and attempts >= max_attempts:
                s.execute(update(Job).where(Job.id == jid, Job.state == state).values(
                    state="failed", finished_at=now, lease_owner="",
                    reason=f"dead-lettered: its worker stopped during {attempts} attempts (lease expired)"))
                add_event(s, "failed", series_id=series_id, job_id=jid, detail="lease expired; attempts used up")
                continue
            res = s.execute(update(Job).where(Job.id == jid, Job.state == state).values(
                state="running", started_at=now, attempts=Job.attempts + 1, lease_owner=owner,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds), heartbeat_at=now))
            if res.rowcount == 1:
                detail = f"attempt {attempts + 1} by {owner}" + ("" if state == "queued" else " (previous worker's lease expired)")
                add_event(s, "running", series_id=series_id, job_id=jid, detail=detail, at=now)
                return jid
    return None


def heartbeat(db: Database, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False if the job is no longer ours (lease expired and taken, or finished)."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.state.in_(("running", "sending"))).values(
            heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))
        return res.rowcount == 1


def superseded_by(db: Database, job_id: int) -> int | None:
    with db.session() as s:
        return s.scalar(select(Job.superseded_by).where(Job.id == job_id))


def set_state(db: Database, job_id: int, state: str, event_detail: str | None = None, **values) -> None:
    """Change a job's state; ``event_detail`` (even empty) also records it on the timeline."""
    if state in ("done", "failed", "skipped"):
        values.setdefault("lease_owner", "")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state, **values))
        if state in ("done", "failed", "skipped"):
            _series_follows(s, job_id, state)
        if event_detail is not None:
            add_event(s, {"done": "delivered"}.get(state, state), series_id=s.get(Job, job_id).series_id,
                      job_id=job_id, detail=event_detail)


def _series_follows(s, job_id: int, state: str) -> None:
    """A series whose newest job ended takes the job's end state (it would otherwise say "queued" forever)."""
    series_id = s.scalar(select(Job.series_id).where(Job.id == job_id))
    newest = s.scalar(select(func.max(Job.id)).where(Job.series_id == series_id))
    if newest == job_id:
        s.execute(update(Series).where(Series.id == series_id, Series.state == "queued").values(state=state))


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


def job_event(db: Database, job_id: int, kind: str, detail: str = "") -> None:
    """A timeline event for a job (on its series' timeline)."""
    with db.session() as s:
        add_event(s, kind, series_id=s.scalar(select(Job.series_id).where(Job.id == job_id)), job_id=job_id,
                  detail=detail)


# ------------------------------------------------------------------------------------------- quality gate
def save_quality(db: Database, job_id: int, verdict: str, summary: str,
                 structures: list[tuple[str, str, str, dict]]) -> None:
    """Store the gate's verdict: one row per structure (name, verdict, reason, metrics), the job's overall
    verdict, and a "quality" event with the summary, in one transaction."""
    with db.session() as s:
        job = s.get(Job, job_id)
        s.execute(QualityCheck.__table__.delete().where(QualityCheck.job_id == job_id))  # a repeated attempt
        for name, v, reason, metrics in structures:
            s.add(QualityCheck(job_id=job_id, structure=name[:32], verdict=v, reason=reason,
                               metrics=json.dumps(metrics)))
        job.quality = verdict
        add_event(s, "quality", series_id=job.series_id, job_id=job_id, detail=summary)


def quality_of(db: Database, job_id: int) -> tuple[str, str, str]:
    """(verdict, review decision, one-line summary of what failed) of a job."""
    with db.session() as s:
        job = s.get(Job, job_id)
        bad = s.execute(select(QualityCheck.structure, QualityCheck.reason).where(
            QualityCheck.job_id == job_id, QualityCheck.verdict == "fail").order_by(QualityCheck.id)).all()
        return job.quality, job.review, " | ".join(f"{n.lower()}: {r}" for n, r in bad)


def hold_for_review(db: Database, job_id: int, detail: str) -> None:
    """The result waits for a person: state ``review``, no lease (nothing claims it; it survives restarts)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        job.state, job.lease_owner, job.lease_expires_at = "review", "", None
        job.reason = detail[:4000]
        add_event(s, "review", series_id=job.series_id, job_id=job_id, detail=detail)


def decide_review(db: Database, job_id: int, decision: str, who: str, address: str = "", note: str = "") -> bool:
    """Approve or reject a held job, once: only a job in ``review`` changes, in one compare-and-set update, so
    two approvals (two admins, a double click) cannot both send. Approved goes back to the queue, and a
    worker delivers the existing result to the destinations that were holding it; rejected is final.
    Returns False when the job is not (or no longer) waiting for review."""
    if decision not in ("approved", "rejected"):
        raise ValueError(decision)
    now = utcnow()
    values = dict(review=decision, reviewed_by=who[:128], reviewed_from=address[:64], reviewed_at=now,
                  review_note=note[:4000])
    if decision == "approved":
        values.update(state="queued", attempts=0, next_attempt_at=None, reason="")
    else:
        values.update(state="rejected", finished_at=now, reason=f"rejected in review: {note}" if note else
                      "rejected in review")
    action = "approve" if decision == "approved" else "reject"
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == "review").values(**values))
        if res.rowcount == 1:
            add_audit(s, who, address, action, job_id, "done", note)
            detail = f"by {who}" + (f" from {address}" if address else "") + (f": {note}" if note else "")
            add_event(s, decision, series_id=s.scalar(select(Job.series_id).where(Job.id == job_id)),
                      job_id=job_id, detail=detail)
            return True
    with db.session() as s:  # refused: the audit trail keeps refused actions too
        exists = s.get(Job, job_id) is not None
        add_audit(s, who, address, action, job_id if exists else None, "refused",
                  "job is not waiting for review" if exists else f"job {job_id}: no such job")
    return False


def quality_counts(db: Database) -> dict[str, int]:
    """Jobs by quality verdict (those the gate has judged)."""
    with db.session() as s:
        return dict(s.execute(select(Job.quality, func.count()).where(Job.quality != "").group_by(Job.quality)).all())


def fail_or_retry(db: Database, job_id: int, error: str, max_attempts: int, backoff_seconds: float = 30.0) -> str:
    """After an error: back to the queue with exponential backoff, or failed (dead letter) when attempts are used up."""
    with db.session() as s:
        job = s.get(Job, job_id)
        job.lease_owner = ""
        if job.attempts < max_attempts:
            job.state = "queued"
            wait = backoff_seconds * 2 ** (job.attempts - 1)
            job.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
            add_event(s, "retry", series_id=job.series_id, job_id=job_id, detail=f"in {wait:.0f} s after: {error}")
        else:
            job.state = "failed"
            job.finished_at = utcnow()
            _series_follows(s, job_id, "failed")
            add_event(s, "failed", series_id=job.series_id, job_id=job_id, detail=f"after {job.attempts} attempts: {error}")
        job.reason = error[:4000]
        return job.state


def requeue(db: Database, job_ids: list[int] | None = None, failed: bool = False, actor: str = "",
            address: str = "", action: str = "retry") -> list[int]:
    """Put jobs back in the queue by hand (``dicom-node retry`` / ``requeue --failed``, the dashboard's retry),
    attempts reset. Each job asked for gets an audit row (who, from where, what, how it ended) and a timeline
    event naming who did it, in the same transaction as the change.

    A job whose result exists and only its delivery failed is not computed again: its failed deliveries go
    back to the outbox (same files, same UIDs) and the job to ``delivering``."""
    from . import deliveries
    from .models import OutboxItem

    who = f"by {actor or 'an admin'}" + (f" from {address}" if address else "")
    with db.session() as s:
        q = select(Job)
        if job_ids is not None:
            q = q.where(Job.id.in_(job_ids))
        if failed:
            q = q.where(Job.state == "failed")
        jobs = s.scalars(q).all()
        redeliver = []
        for job in jobs:
            if job.state in ("running", "sending", "delivering"):
                add_audit(s, actor, address, action, job.id, "refused", f"job is {job.state}")
                add_event(s, f"{action}-refused", series_id=job.series_id, job_id=job.id,
                          detail=f"{who}: job is {job.state}")
                continue
            has_failed_delivery = s.scalar(select(func.count()).select_from(OutboxItem).where(
                OutboxItem.job_id == job.id, OutboxItem.state == "failed"))
            if job.state == "failed" and has_failed_delivery:
                redeliver.append(job.id)
                add_audit(s, actor, address, action, job.id, "done", "failed delivery → outbox again")
                add_event(s, "redeliver", series_id=job.series_id, job_id=job.id, detail=who)
                continue
            before = job.state
            job.state, job.attempts, job.next_attempt_at, job.finished_at, job.lease_owner = "queued", 0, None, None, ""
            add_audit(s, actor, address, action, job.id, "done", f"{before} → queued")
            add_event(s, "requeued", series_id=job.series_id, job_id=job.id, detail=who)
        found = {j.id for j in jobs}
        for missing in sorted(set(job_ids or []) - found):
            add_audit(s, actor, address, action, None, "refused",
                      f"job {missing}: no such job" + (" in state failed" if failed else ""))
        queued = [j.id for j in jobs if j.state == "queued"]
    if redeliver:
        deliveries.requeue(db, job_ids=redeliver)
    return sorted(queued + redeliver)


def add_audit(s, actor: str, address: str, action: str, job_id: int | None, outcome: str, detail: str = "") -> None:
    """One row of the admin audit trail (inside the caller's transaction)."""
    s.add(AuditEntry(actor=(actor or "unknown")[:128], address=address[:128], action=action[:32], job_id=job_id,
                     outcome=outcome[:32], detail=detail[:2000], at=utcnow()))


def audit_log(db: Database, job_id: int | None = None, limit: int = 200) -> list[dict]:
    """The newest audit rows (of one job, or all), newest first."""
    with db.session() as s:
        q = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(AuditEntry.job_id == job_id)
        return [{"at": a.at.isoformat(timespec="milliseconds"), "actor": a.actor, "address": a.address,
                 "action": a.action, "job": a.job_id, "outcome": a.outcome, "detail": a.detail}
                for a in s.scalars(q)]


def release_dead_local_leases(db: Database, host: str) -> int:
    """Expire at once the leases of processes on this host that no longer exist (a crash or reboot), so
    their jobs are taken again without waiting for the lease to run out. Owners look like host:pid:role."""
    import os

    now = utcnow()
    released = 0
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.state.in_(("running", "sending")), Job.lease_owner.like(f"{host}:%"))):
            try:
                pid = int(job.lease_owner.split(":")[1])
                os.kill(pid, 0)
                continue  # still alive
            except ProcessLookupError:
                pass
            except (ValueError, IndexError, PermissionError):
                continue
            job.lease_expires_at = now
            add_event(s, "lease-expired", series_id=job.series_id, job_id=job.id, detail=f"{job.lease_owner} is gone")
            released += 1
    return released


def expired_leases(db: Database) -> list[tuple[int, str]]:
    with db.session() as s:
        return list(s.execute(select(Job.id, Job.lease_owner).where(
            Job.state.in_(("running", "sending")), Job.lease_expires_at < utcnow())).all())


def purge_delivered_images(db: Database, hours: float) -> int:
    """Delete stored instance files of series whose newest job was delivered more than ``hours`` ago."""
    import os

    cutoff = utcnow() - dt.timedelta(hours=hours)
    removed = 0
    with db.session() as s:
        newest = select(Job.series_id, func.max(Job.id).label("jid")).group_by(Job.series_id).subquery()
        rows = s.execute(select(Job.series_id).join(newest, newest.c.jid == Job.id).where(
            Job.state == "done", Job.finished_at < cutoff)).scalars().all()
        for series_id in rows:
            insts = s.scalars(select(Instance).where(Instance.series_id == series_id, Instance.path != "")).all()
            for inst in insts:
                try:
                    os.remove(inst.path)
                except FileNotFoundError:
                    pass
                inst.path = ""
                removed += 1
            if insts:
                add_event(s, "purged", series_id=series_id, detail=f"{len(insts)} images removed (retention)")
    return removed


def counts(db: Database) -> dict[str, dict[str, int]]:
    with db.session() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        n_inst = s.scalar(select(func.count()).select_from(Instance)) or 0
        n_studies = s.scalar(select(func.count()).select_from(Study)) or 0
    return {"jobs": jobs, "series": series, "totals": {"studies": n_studies, "instances": n_inst}}
