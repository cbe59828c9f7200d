"""How long a result took, as a radiologist counts it: from the series' last image to delivery, with the time
it waited for a person's review reported apart.

A job held for review is run again after approval, which resets ``started_at``; measured from there, an
approved job seemed to take a tenth of a second. The last image and the hold event do not move, so both
figures are taken from them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Event, Job, Series
from .states import EventKind, JobState


@dataclass(frozen=True)
class Latency:
    #: last image received → finished (delivered, or ended), review wait included; None while unfinished
    total_s: float | None
    #: held for review → decided; None if the job was never held or is still waiting
    review_wait_s: float | None

    @property
    def node_s(self) -> float | None:
        """The part of ``total_s`` the node itself spent (review wait taken out)."""
        if self.total_s is None:
            return None
        return max(0.0, self.total_s - (self.review_wait_s or 0.0))


def held_at(s: Session, job_ids: Iterable[int]) -> dict[int, dt.datetime]:
    """When each of these jobs was (last) held for review, by its timeline event: one query for them all."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = s.execute(select(Event.job_id, func.max(Event.at)).where(Event.kind == EventKind.REVIEW,
                                                                     Event.job_id.in_(ids))
                     .group_by(Event.job_id)).all()
    return {job_id: at for job_id, at in rows if job_id is not None}


def latency(job: Job, last_image: dt.datetime | None, held: dt.datetime | None) -> Latency:
    """The two figures of one job. ``last_image`` is its series' newest instance; if images came after the job
    was created (a later job took the series over), the job's own creation stands for its last image."""
    start = job.created_at if last_image is None or last_image > job.created_at else last_image
    total = (job.finished_at - start).total_seconds() if job.finished_at and start else None
    wait = None
    if held is not None and job.reviewed_at is not None and job.reviewed_at >= held:
        wait = (job.reviewed_at - held).total_seconds()
    return Latency(total, wait)


def finished_latencies(s: Session, since: dt.datetime) -> list[tuple[dt.datetime, Latency]]:
    """(finished at, latency) of every job done since ``since``: the dashboard's hourly chart."""
    rows = s.execute(select(Job, Series.last_received_at).join(Series, Job.series_id == Series.id)
                     .where(Job.state == JobState.DONE, Job.finished_at >= since)).all()
    held = held_at(s, (job.id for job, _ in rows))
    return [(job.finished_at, latency(job, last, held.get(job.id)))
            for job, last in rows if job.finished_at is not None]
