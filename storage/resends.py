"""Re-sent instances on the series' timeline: identical copies counted per burst, conflicting ones one by one.

Why aggregated: a PACS that re-sends a whole series after a dropped association sends hundreds of identical
copies; one event per copy would bury the timeline, none would hide that it happened. So identical copies of
one series make one ``duplicates`` event whose count is kept up to date while copies keep coming (each less
than ``BURST_GAP_S`` after the previous one): "re-sent: 120 identical copies". A conflicting re-send (same SOP
Instance UID, other content or another series) is rarer and matters more: one ``conflicting-resend`` event on
the series that holds the instance, and one on the series it was sent into, if that series exists.

The log names series by their database ids and instances by a short hash of their UID (no patient data).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from dataclasses import dataclass, field

from sqlalchemy import update

from .models import Event
from .states import EventKind
from .timeline import add_event

log = logging.getLogger("storage.resends")

#: identical copies of one series less than this far apart count as one burst (one event)
BURST_GAP_S = 60.0


def uid_tag(uid: str) -> str:
    """A short, stable stand-in for a UID in logs and events (the UID itself stays in the database)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


@dataclass
class _Burst:
    event_id: int
    count: int
    last: dt.datetime


@dataclass
class ResendBatch:
    """What one recorded batch did with re-sent instances; applied to the bursts and counters after commit."""

    identical: dict[int, list] = field(default_factory=dict)  # series id -> [count, latest arrival, calling AE]
    conflicts: int = 0
    remove: list[str] = field(default_factory=list)  # files no row points at any more (removed after commit)
    new_bursts: dict[int, tuple[Event | int, int, dt.datetime]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # log lines, written once the batch is committed


class ResendTimeline:
    """Writes re-sends onto the timeline inside the Recorder's transaction."""

    def __init__(self) -> None:
        self._bursts: dict[int, _Burst] = {}

    def identical(self, batch: ResendBatch, series_id: int, at: dt.datetime, calling_aet: str) -> None:
        t = batch.identical.setdefault(series_id, [0, at, calling_aet])
        t[0] += 1
        t[1] = max(t[1], at)
        t[2] = calling_aet

    def conflict(self, s, batch: ResendBatch, *, sop_uid: str, first_series: int, target_series: int | None,
                 calling_aet: str, replaced: bool, answered: bool) -> None:
        """One conflicting re-send: events on the series holding the instance and on the one it was sent to."""
        batch.conflicts += 1
        tag = uid_tag(sop_uid)
        elsewhere = target_series is not None and target_series != first_series
        if target_series == first_series:
            what = "with other content"
        elif elsewhere:
            what = f"into series #{target_series}"
        else:
            what = "into a series not otherwise received"
        when = "" if answered else " (found after the success status was sent)"
        if replaced:
            outcome = "the newer copy replaced the first" + (f" and moved to series #{target_series}" if elsewhere
                                                             else "")
        else:
            outcome = "not stored: the first copy is kept"
        policy = "replace" if replaced else "keep"
        detail = (f"instance {tag} re-sent {what} by {calling_aet or 'an unnamed AE'}{when}: {outcome} "
                  f"(scp.duplicate_policy = {policy})")
        add_event(s, EventKind.CONFLICTING_RESEND, series_id=first_series, detail=detail)
        if elsewhere:
            add_event(s, EventKind.CONFLICTING_RESEND, series_id=target_series,
                      detail=f"instance {tag} of series #{first_series} re-sent here by "
                             f"{calling_aet or 'an unnamed AE'}"
                             f"{when}: {outcome} (scp.duplicate_policy = {policy})")
        batch.lines.append(f"conflicting re-send: instance {tag} of series #{first_series} re-sent {what} by "
                           f"{calling_aet or 'an unnamed AE'}{when}; {outcome} (scp.duplicate_policy = {policy})")

    def write(self, s, batch: ResendBatch) -> None:
        """The identical copies' events: a running burst's count updated, else a new event."""
        for sid, (n, last, aet) in batch.identical.items():
            b = self._bursts.get(sid)
            if b is not None and (last - b.last).total_seconds() < BURST_GAP_S:
                s.execute(update(Event).where(Event.id == b.event_id)
                          .values(detail=_identical_detail(b.count + n, aet)))
                batch.new_bursts[sid] = (b.event_id, b.count + n, last)
            else:
                ev = add_event(s, EventKind.DUPLICATES, series_id=sid, detail=_identical_detail(n, aet), at=last)
                batch.new_bursts[sid] = (ev, n, last)
                batch.lines.append(f"identical re-send into series #{sid} by {aet or 'an unnamed AE'}: counted on "
                                   "its timeline, not stored again")
        if batch.new_bursts:
            s.flush()  # new events get their ids

    def committed(self, batch: ResendBatch) -> None:
        """After the commit: remember the bursts, remove files no row points at, log."""
        for sid, (ev, n, last) in batch.new_bursts.items():
            self._bursts[sid] = _Burst(ev if isinstance(ev, int) else ev.id, n, last)
        if len(self._bursts) > 1000:  # series long finished: their bursts are over
            newest = sorted(self._bursts.items(), key=lambda kv: kv[1].last)[-500:]
            self._bursts = dict(newest)
        for path in batch.remove:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("could not remove a replaced or refused copy (%s): %s", os.path.basename(path), exc)
        for line in batch.lines:
            log.warning(line) if line.startswith("conflicting") else log.info(line)


def _identical_detail(n: int, calling_aet: str) -> str:
    return (f"re-sent: {n} identical {'copy' if n == 1 else 'copies'} of stored instances, not stored again "
            f"(last from {calling_aet or 'an unnamed AE'})")
