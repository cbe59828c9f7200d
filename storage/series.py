"""Series in the database on their way to complete: which are receiving or quiet, what the completion check
needs to know of one (``CompletionView``), what a source says it holds, fetch attempts, and quiet periods.

Why its own module: these are the queries of the decide stage (``dicom_node.decide.completion``), which reads
series and never jobs; the step that closes a series and makes its job is ``storage.jobs.mark_judged``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import case, func, select, update

from .db import Database
from .models import Instance, Series, Study, utcnow
from .rows import get_row
from .states import EventKind, SeriesState
from .timeline import add_event


def stable_series(db: Database, stable_seconds: float) -> list[int]:
    """Series still RECEIVING whose last instance arrived more than ``stable_seconds`` ago, and whose quiet
    period was not extended beyond now (an aborted association or an unclean stop: see ``extend_quiet``)."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    with db.session() as s:
        return list(s.scalars(select(Series.id).where(
            Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff,
            Series.quiet_until.is_(None) | (Series.quiet_until <= now))))


def receiving_series(db: Database) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Series.id).where(Series.state == SeriesState.RECEIVING)))


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
            add_event(s, EventKind.EXPECTED, series_id=series_id, detail=detail)
        return changed


def count_fetch(db: Database, series_id: int, detail: str) -> int:
    """One more attempt to fetch missing instances (on the timeline); returns the attempt's number."""
    with db.session() as s:
        s.execute(update(Series).where(Series.id == series_id).values(fetch_attempts=Series.fetch_attempts + 1))
        n = s.scalar(select(Series.fetch_attempts).where(Series.id == series_id)) or 0
        add_event(s, EventKind.FETCH, series_id=series_id, detail=f"attempt {n}: {detail}")
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
        q = select(Series.id, Series.series_uid).where(Series.state == SeriesState.RECEIVING)
        if series_uids is not None:
            q = q.where(Series.series_uid.in_(series_uids))
        if series_ids is not None:
            q = q.where(Series.id.in_(series_ids))
        found = dict(s.execute(q).all())
        for sid in found:
            s.execute(update(Series).where(Series.id == sid).values(
                quiet_until=case((Series.quiet_until > until, Series.quiet_until), else_=until)))
            add_event(s, EventKind.WAIT, series_id=sid, detail=reason)
        return found


def end_quiet(db: Database, series_uids: list[str], reason: str) -> int:
    """The resend that an extended quiet period waited for has arrived (its association ended with a
    release): the series settle on ``stable_seconds`` again. Returns how many were waiting."""
    with db.session() as s:
        ids = list(s.scalars(select(Series.id).where(Series.series_uid.in_(series_uids),
                                                     Series.quiet_until.is_not(None))))
        for sid in ids:
            s.execute(update(Series).where(Series.id == sid).values(quiet_until=None))
            add_event(s, EventKind.RESENT, series_id=sid, detail=reason)
        return len(ids)


def series_instances(db: Database, series_id: int) -> tuple[Series, list[Instance]]:
    with db.session() as s:
        se = get_row(s, Series, series_id)
        insts = list(s.scalars(select(Instance).where(Instance.series_id == series_id)))
        _ = se.study  # load for later use outside the session
        return se, insts
