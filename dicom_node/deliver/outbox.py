"""The sender loop: works the outbox (storage/deliveries.py) apart from the inference workers.

Runs as a thread of ``serve`` and alone as ``dicom-node sender``. Each round, per destination: rows queued
longer than ``give_up_after_hours`` are failed (admins told); if the destination is down and its clock has
not run out, nothing is tried; otherwise every due row is claimed and sent on ONE association (SEG and SR
of several jobs), and with ``storage_commitment`` each row's instances are N-ACTIONed for commitment.
A connection-level failure (refused, timeout, rejected, aborted) marks the destination down: all its rows
wait together on its backoff clock; its first success wakes them all.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_role
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from storage import deliveries
from storage.db import Database
from storage.models import Job, utcnow

from ..config import Destination, Settings
from ..notify import notify
from ..receive.dimse import COMMITMENT_INSTANCE, COMMITMENT_SOP_CLASS, commitment_report
from .delivery import files_for
from ..tls import client_context, server_name
from .sender import SendResult, set_nodelay, stow

log = logging.getLogger("dicom_node.deliver.outbox")

#: Statuses a C-STORE may answer that mean "stored" (success and the storage warnings, PS3.4 B.2.3).
STORED = (0x0000, 0xB000, 0xB006, 0xB007)

_REJECT_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}
_REJECT_SOURCE = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_REJECT_REASON = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 0): "reserved", (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


class DestinationError(Exception):
    """The destination could not be reached or refused the association: every row waits for it."""


def rejection_words(result: int, source: int, reason: int) -> str:
    return (f"association rejected: {_REJECT_RESULT.get(result, f'result {result}')}, source "
            f"{_REJECT_SOURCE.get(source, source)}, reason {_REJECT_REASON.get((source, reason), reason)}")


def status_words(status: int) -> str:
    """A C-STORE / N-ACTION status with its meaning (PS3.4 B.2.3, PS3.7 C)."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    return f"status 0x{status:04X} ({meaning})"


def outbox_files(settings: Settings, job_dir: Path) -> dict[str, list[dict]]:
    """Per destination, the files of its profile with their SOP class and instance (read once, at queueing,
    so that every re-send carries exactly these UIDs)."""
    read: dict[str, dict] = {}  # destinations of one profile share files: each is read once

    def meta(path: str) -> dict:
        if path not in read:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            read[path] = {"path": path, "sop_class": str(ds.SOPClassUID), "sop_uid": str(ds.SOPInstanceUID),
                          "ts": str(ds.file_meta.TransferSyntaxUID)}
        return read[path]

    return {dest.name: [meta(path) for path in files_for(dest, job_dir)] for dest in settings.destinations}


def probe(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection, to name why a destination is unreachable (pynetdicom's associate
    reports every such case as an abort)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        raise DestinationError(f"connection refused by {host}:{port}") from None
    except (socket.timeout, TimeoutError):
        raise DestinationError(f"timeout: no TCP connection to {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise DestinationError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


class Outbox:
    """One sender: ``run_once`` works every destination once; ``run_forever`` until stopped."""

    def __init__(self, settings: Settings, db: Database, owner: str):
        self.settings, self.db, self.owner = settings, db, owner
        self.connect_timeout = 10.0
        self.same_association_wait = 2.0
        self._wake = threading.Event()

    # ------------------------------------------------------------------------------ loop
    def wake(self) -> None:
        """A worker in this process just queued a result: look now rather than at the next poll."""
        self._wake.set()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # the sender must outlive any one error (a database hiccup, a bad file)
                log.exception("sender round failed")
            self._wake.wait(self.settings.sender.poll_seconds)
            self._wake.clear()

    def run_once(self) -> int:
        """One round over every destination; returns how many deliveries were tried."""
        tried = 0
        deliveries.release_dead_local_claims(self.db, socket.gethostname())
        deliveries.cancel_superseded(self.db)
        for dest in self.settings.destinations:
            for _, job_id, reason in deliveries.give_up(self.db, dest.name, dest.give_up_after_hours):
                self._told_failed(dest, job_id, reason)
            if dest.storage_commitment:
                for _, job_id, reason in deliveries.overdue_commitments(self.db, dest.name,
                                                                         dest.commitment_max_requests):
                    self._told_failed(dest, job_id, reason)
            if deliveries.destination_wait(self.db, dest.name) > 0:
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

    def _told_failed(self, dest: Destination, job_id: int, reason: str) -> None:
        log.error("delivery of job %s to %s failed: %s", job_id, dest.name, reason)
        notify(self.settings, "delivery-failed", {"job": job_id, "destination": dest.name, "reason": reason})
        with self.db.session() as s:
            job = s.get(Job, job_id)
            state, series_uid = job.state, job.series.series_uid
        if state == "failed":
            notify(self.settings, "job-failed", {"job": job_id, "series_uid": series_uid, "reason": reason})

    # ------------------------------------------------------------------------------ one destination
    def _deliver(self, dest: Destination, items: list[deliveries.Claimed]) -> None:
        started = utcnow()
        try:
            if dest.protocol == "stow":
                self._stow(dest, items, started)
            else:
                self._dimse(dest, items, started)
        except DestinationError as exc:
            reason = str(exc)
            next_at = deliveries.destination_failed(self.db, dest.name, reason, dest.retry_initial_seconds,
                                                    dest.retry_max_seconds)
            log.warning("destination %s: %s; %d deliveries wait until %s", dest.name, reason, len(items),
                        next_at.strftime("%H:%M:%S"))
            for it in items:
                deliveries.mark_retry(self.db, it.id, started, reason, next_at)

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

    def _stow(self, dest: Destination, items: list[deliveries.Claimed], started: dt.datetime) -> None:
        url = urlsplit(dest.url)
        probe(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), self.connect_timeout)
        self._up(dest)
        for it in items:
            res: SendResult = stow(dest.url, [f["path"] for f in it.files], dest.username, dest.password)
            if res.ok:
                deliveries.mark_sent(self.db, it.id, started, f"{res.sent} instances by STOW-RS")
            else:
                self._row_failed(dest, it, started, "; ".join(f"{u}: {e}" for u, e in res.failed))

    def _dimse(self, dest: Destination, items: list[deliveries.Claimed], started: dt.datetime) -> None:
        probe(dest.host, dest.port, self.connect_timeout)
        ae = AE(ae_title=dest.calling_ae_title or self.settings.scp.ae_title)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 120, 60
        ae.connection_timeout = self.connect_timeout
        contexts: dict[str, set] = {}
        for it in items:
            for f in it.files:
                contexts.setdefault(f["sop_class"], set()).update({f.get("ts") or ExplicitVRLittleEndian,
                                                                  ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        for sop_class, tss in list(contexts.items())[:120]:
            ae.add_requested_context(sop_class, sorted(tss))
        roles = []
        if dest.storage_commitment:
            ae.add_requested_context(COMMITMENT_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            # we may also be the SCP of this class here: the archive may answer on this association
            roles = [build_role(COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)]
        rejection: list = []

        def on_acse(event) -> None:
            # only an A-ASSOCIATE answer carries a rejection; an A-RELEASE has a result ("affirmative") too
            p = event.primitive
            if isinstance(p, A_ASSOCIATE) and p.result not in (None, 0):
                rejection.append((p.result, p.result_source, p.diagnostic))

        handlers = [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_ACSE_RECV, on_acse),
                    (evt.EVT_N_EVENT_REPORT, self._on_report)]
        tls = (client_context(dest), server_name(dest)) if dest.tls else None  # DICOM TLS (BCP 195)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=0, ext_neg=roles or None,
                             evt_handlers=handlers, tls_args=tls)
        if not assoc.is_established:
            if rejection:
                r = rejection[0]
                raise DestinationError(rejection_words(int(r[0]), int(r[1]), int(getattr(r[2], "value", r[2]) or 0)))
            # pynetdicom reports a failed TLS handshake (certificate not trusted, wrong name, ours refused) as
            # an abort: say so where TLS is on
            tls_hint = (" (DICOM TLS: or the handshake failed - check tls_ca, tls_server_name and our client "
                        "certificate)") if dest.tls else ""
            if assoc.is_aborted:
                raise DestinationError(f"association aborted by {dest.host}:{dest.port} before it was accepted"
                                       + tls_hint)
            raise DestinationError(f"no answer to the association request from {dest.host}:{dest.port} "
                                   f"within {ae.acse_timeout} s")
        self._up(dest)
        waiting_commit: list[int] = []
        n = 0
        try:
            for n, it in enumerate(items):
                if not assoc.is_established:
                    raise DestinationError(f"association aborted by {dest.host}:{dest.port} while sending")
                error = self._store_row(assoc, it)
                if error:
                    self._row_failed(dest, it, started, error)
                    continue
                detail = f"{len(it.files)} instances by C-STORE"
                if dest.storage_commitment:
                    error = self._request_commitment(assoc, dest, it, started, detail)
                    if error:
                        self._row_failed(dest, it, started, error)
                    else:
                        waiting_commit.append(it.id)
                else:
                    deliveries.mark_sent(self.db, it.id, started, detail)
            if waiting_commit and assoc.is_established:
                # the archive may answer on this association at once; otherwise it opens one to our listener
                threading.Event().wait(self.same_association_wait)
        except DestinationError:
            done = set(waiting_commit)
            rest = [it for it in items[n:] if it.id not in done]
            reason = f"association aborted by {dest.host}:{dest.port} while sending"
            next_at = deliveries.destination_failed(self.db, dest.name, reason, dest.retry_initial_seconds,
                                                    dest.retry_max_seconds)
            for it in rest:
                deliveries.mark_retry(self.db, it.id, started, reason, next_at)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_row(self, assoc, it: deliveries.Claimed) -> str:
        """C-STORE one row's files; returns what went wrong ("" when every file was stored)."""
        problems = []
        for f in it.files:
            kind = Path(f["path"]).name.split("_")[0]
            try:
                st = assoc.send_c_store(f["path"])
            except FileNotFoundError:
                problems.append(f"{kind}: result file missing ({Path(f['path']).name})")
                continue
            except ValueError as exc:  # no accepted presentation context for its SOP class
                problems.append(f"{kind}: the destination does not accept SOP class {f['sop_class']} ({exc})")
                continue
            if not st:
                if not assoc.is_established:
                    raise DestinationError("association aborted while sending")
                problems.append(f"{kind}: no C-STORE response (timeout)")
            elif st.Status not in STORED:
                problems.append(f"{kind}: C-STORE {status_words(st.Status)}")
        return "; ".join(problems)

    def _request_commitment(self, assoc, dest: Destination, it: deliveries.Claimed, started: dt.datetime,
                            detail: str) -> str:
        """N-ACTION (Request Storage Commitment, action type 1) for the row's instances under a new
        transaction; the answer (N-EVENT-REPORT) is recorded by transaction UID wherever it arrives."""
        txn = generate_uid()
        deadline = utcnow() + dt.timedelta(seconds=dest.commitment_timeout_seconds)
        deliveries.set_transaction(self.db, it.id, txn)
        ds = Dataset()
        ds.TransactionUID = txn
        refs = []
        for f in it.files:
            r = Dataset()
            r.ReferencedSOPClassUID = f["sop_class"]
            r.ReferencedSOPInstanceUID = f["sop_uid"]
            refs.append(r)
        ds.ReferencedSOPSequence = refs
        try:
            status, _ = assoc.send_n_action(ds, 1, COMMITMENT_SOP_CLASS, COMMITMENT_INSTANCE)
        except ValueError as exc:
            return f"the destination does not accept Storage Commitment ({exc})"
        if not status:
            return "no N-ACTION response to the Storage Commitment request (timeout or abort)"
        if status.Status != 0x0000:
            return f"Storage Commitment request refused: N-ACTION status 0x{status.Status:04X}"
        deliveries.mark_sent(self.db, it.id, started, detail, (txn, deadline))
        return ""

    def _on_report(self, event) -> int:
        """N-EVENT-REPORT on our own association (the archive answered at once)."""
        try:
            txn, committed, failed = commitment_report(event.event_information)
            log.info("Storage Commitment answer on the sending association: %s",
                     deliveries.record_commitment(self.db, txn, committed, failed))
            return 0x0000
        except Exception:
            log.exception("Storage Commitment answer could not be recorded")
            return 0x0110

