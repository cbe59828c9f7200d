"""The sender loop: works the outbox (storage/deliveries.py) apart from the inference workers.

Runs as a thread of ``serve`` and alone as ``dicom-node sender``. Each round, per destination: rows queued
longer than ``give_up_after_hours`` are failed (admins told), as are rows whose archive never answered a
Storage Commitment request; if the destination is down and its clock has not run out, nothing is tried;
otherwise every due row is claimed and handed to the destination's transport (dispatch.py: DIMSE C-STORE on
one association, or STOW-RS), which says per row what happened. A failure of the destination as a whole
(refused, timeout, rejected, aborted) marks it down: all its rows wait together on its backoff clock; its
first success wakes them all. While it is down it is also probed every ``probe_seconds`` (probe.py: one
C-ECHO or QIDO request, apart from the backoff): the first probe answered marks it up, which makes its rows
due at once, and wakes this loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading

from storage import deliveries
from storage.db import Database
from storage.filestore import UnsafePath, resolve_stored
from storage.models import Job, utcnow
from storage.rows import get_row
from storage.states import JobState

from ..config import Destination, Settings
from ..notify import notify
from ..repeats import Repeats
from . import commitment
from .dispatch import transport_for
from .probe import Prober, check
from .transport import DestinationError, Outcome

log = logging.getLogger("dicom_node.deliver.outbox")


class Outbox:
    """One sender: ``run_once`` works every destination once; ``run_forever`` until stopped."""

    def __init__(self, settings: Settings, db: Database, owner: str):
        self.settings, self.db, self.owner = settings, db, owner
        self.connect_timeout = 10.0
        self.same_association_wait = 2.0
        self._wake = threading.Event()
        self.prober = Prober(self._answered_probe, lambda dest: check(dest, settings.scp.ae_title))
        self._next_probe_in: float | None = None  # after a round: seconds until the soonest probe is due

    # ------------------------------------------------------------------------------ loop
    def wake(self) -> None:
        """A worker in this process just queued a result: look now rather than at the next poll."""
        self._wake.set()

    def run_forever(self, stop: threading.Event) -> None:
        repeats = Repeats(log, "sender round")
        try:
            while not stop.is_set():
                with repeats:  # the sender must outlive any one error (a database hiccup, a bad file)
                    self.run_once()
                wait = self.settings.sender.poll_seconds
                if self._next_probe_in is not None:
                    wait = min(wait, self._next_probe_in + 0.05)
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self.prober.close()

    def run_once(self) -> int:
        """One round over every destination; returns how many deliveries were tried."""
        tried = 0
        self._next_probe_in = None
        deliveries.release_dead_local_claims(self.db, socket.gethostname())
        deliveries.cancel_superseded(self.db)
        for dest in self.settings.destinations:
            for _, job_id, reason in deliveries.give_up(self.db, dest.name, dest.give_up_after_hours):
                self._told_failed(dest, job_id, reason)
            for job_id, reason in commitment.fail_overdue(self.db, dest):
                self._told_failed(dest, job_id, reason)
            if deliveries.destination_wait(self.db, dest.name) > 0:
                self._probe(dest)
                continue
            items = deliveries.claim(self.db, dest.name, self.owner, self.settings.sender.claim_seconds,
                                     self.settings.sender.batch_size)
            if items:
                tried += len(items)
                self._deliver(dest, items)
        for alert in deliveries.destinations_to_alert(self.db, self.settings.notifications.destination_down_minutes):
            log.error("destination %s is down since %s: %s", alert["destination"], alert["down_since"],
                      alert["last_error"])
            notify(self.settings, "destination-down", alert)
        return tried

    def _probe(self, dest: Destination) -> None:
        """The destination is down and its backoff runs: probe it if its interval is up (in the background),
        and note when the next probe is due, so that the loop does not sleep past it."""
        self.prober.maybe_probe(dest)
        due = dest.probe_seconds if self.prober.in_flight(dest.name) else self.prober.due_in(dest)
        self._next_probe_in = due if self._next_probe_in is None else min(self._next_probe_in, due)

    def _answered_probe(self, dest: Destination) -> None:
        """A probe was answered (in the probe's thread): up again, its rows due now, the loop woken."""
        self._up(dest)
        log.info("destination %s answered a probe: its waiting deliveries go out now", dest.name)
        self.wake()

    def _told_failed(self, dest: Destination, job_id: int, reason: str) -> None:
        log.error("delivery of job %s to %s failed: %s", job_id, dest.name, reason)
        notify(self.settings, "delivery-failed", {"job": job_id, "destination": dest.name, "reason": reason})
        with self.db.session() as s:
            job = get_row(s, Job, job_id)
            state, series_uid = job.state, job.series.series_uid
        if state == JobState.FAILED:
            notify(self.settings, "job-failed", {"job": job_id, "series_uid": series_uid, "reason": reason})

    # ------------------------------------------------------------------------------ one destination
    def _located(self, items: list[deliveries.Claimed], started: dt.datetime,
                 dest: Destination) -> list[deliveries.Claimed]:
        """The rows with their files' stored paths resolved in the data folder as it is now (a moved or restored
        folder sends from where it is). A row with a path that leads outside the folder fails as a row with a
        missing file does."""
        ready = []
        for it in items:
            try:
                it.files = [{**f, "path": str(resolve_stored(self.settings.data_dir, f["path"]))} for f in it.files]
            except (FileNotFoundError, UnsafePath) as exc:
                self._row_failed(dest, it, started, f"result file missing: {exc}")
                continue
            ready.append(it)
        return ready

    def _deliver(self, dest: Destination, items: list[deliveries.Claimed]) -> None:
        started = utcnow()
        items = self._located(items, started, dest)
        if not items:
            return
        transport = transport_for(dest, self.settings, self.db, self.connect_timeout, self.same_association_wait)
        answered: set[int] = set()
        try:
            for it, outcome in transport.send(items, dest, lambda: self._up(dest)):
                answered.add(it.id)
                self._record(dest, it, started, outcome)
        except DestinationError as exc:
            reason = str(exc)
            self.prober.tried(dest.name)
            next_at = deliveries.destination_failed(self.db, dest.name, reason, dest.retry_initial_seconds,
                                                    dest.retry_max_seconds)
            rest = [it for it in items if it.id not in answered]
            log.warning("destination %s: %s; %d deliveries wait until %s", dest.name, reason, len(rest),
                        next_at.strftime("%H:%M:%S"))
            for it in rest:
                deliveries.mark_retry(self.db, it.id, started, reason, next_at)

    def _record(self, dest: Destination, it: deliveries.Claimed, started: dt.datetime, outcome: Outcome) -> None:
        if outcome.ok:
            deliveries.mark_sent(self.db, it.id, started, outcome.detail, outcome.commitment)
        else:
            self._row_failed(dest, it, started, outcome.detail)

    def _up(self, dest: Destination) -> None:
        alerted, down_since = deliveries.destination_ok(self.db, dest.name)
        if down_since is not None:
            log.info("destination %s answers again (down since %s)", dest.name, down_since.strftime("%H:%M:%S"))
            if alerted:
                notify(self.settings, "destination-up", {"destination": dest.name,
                                                         "down_since": down_since.isoformat(timespec="seconds") + "Z"})

    def _row_failed(self, dest: Destination, it: deliveries.Claimed, started: dt.datetime, error: str) -> None:
        """A failure of this row only (a status, a missing file): its own backoff; the destination is up."""
        wait = deliveries.backoff(dest.retry_initial_seconds, dest.retry_max_seconds, it.attempts)
        log.warning("delivery %s (job %s) to %s: %s", it.id, it.job_id, dest.name, error)
        deliveries.mark_retry(self.db, it.id, started, error, utcnow() + dt.timedelta(seconds=wait))
