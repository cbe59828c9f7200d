"""DIMSE transport: the node's C-STORE and C-ECHO SCU (results to destinations through the outbox, and
``dicom-node send``/``echo``), with Storage Commitment asked for where the destination wants it.

One association per batch of files, TCP_NODELAY on the socket, every presentation context the files need.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from storage.db import Database
from storage.deliveries import Claimed

from ..config import Destination
from ..encode.results import ResultFiles
from ..errors import network_reason
from ..tls import client_context, server_name
from . import commitment
from .transport import DestinationError, Outcome, probe

log = logging.getLogger("dicom_node.deliver.dimse")


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


def rejection_words(result: int, source: int, reason: int) -> str:
    return (f"association rejected: {_REJECT_RESULT.get(result, f'result {result}')}, source "
            f"{_REJECT_SOURCE.get(source, source)}, reason {_REJECT_REASON.get((source, reason), reason)}")


def status_words(status: int) -> str:
    """A C-STORE / N-ACTION status with its meaning (PS3.4 B.2.3, PS3.7 C)."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    return f"status 0x{status:04X} ({meaning})"


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN (pynetdicom, when we send): disable Nagle, or every small PDU waits ~40 ms for the
    peer's delayed ACK."""
    try:
        dul_socket = event.assoc.dul.socket
        sock = dul_socket.socket if dul_socket is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log.debug("TCP_NODELAY not set: %s", exc)


@dataclass
class SendResult:
    sent: int
    failed: list[tuple[str, str]]  # (file or SOP Instance UID, status/error)

    @property
    def ok(self) -> bool:
        return not self.failed


def _ae(calling: str) -> AE:
    ae = AE(ae_title=calling or "SEGNODE")
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 60
    return ae


#: DICOM TLS for one association: the client context (tls.client_context) and the name its certificate must carry.
TlsArgs = tuple[ssl.SSLContext, str]


def echo(host: str, port: int, called: str, calling: str = "SEGNODE", tls: TlsArgs | None = None) -> tuple[bool, str]:
    try:  # pynetdicom reports a refused, unreachable or unresolvable peer as an aborted association
        probe(host, port, 10)
    except DestinationError as exc:
        return False, str(exc)
    ae = _ae(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
                         tls_args=tls)
    if not assoc.is_established:
        return False, _why_not(assoc, tls is not None)
    try:
        st = assoc.send_c_echo()
        ok = bool(st) and st.Status == 0
        return ok, f"status 0x{st.Status:04X}" if st else "no response (timeout or abort)"
    finally:
        assoc.release()


def _why_not(assoc, tls: bool = False) -> str:
    if assoc.is_rejected:
        return "association rejected by the peer"
    # pynetdicom reports a failed TLS handshake (certificate not trusted, wrong name, ours refused) as an abort
    hint = " (DICOM TLS: or the handshake failed - certificate not trusted, wrong name, or ours refused)" if tls else ""
    if assoc.is_aborted:
        return "association aborted" + hint
    return "could not connect" + hint


def send_items(host: str, port: int, called: str, items: list, calling: str = "SEGNODE",
               tls: TlsArgs | None = None) -> SendResult:
    """C-STORE each item (a pydicom Dataset or a file path) over one association (DICOM TLS with ``tls``)."""
    metas: list[tuple[pydicom.Dataset | str, pydicom.uid.UID, pydicom.uid.UID]] = []
    for it in items:
        if isinstance(it, pydicom.Dataset):
            ts = it.file_meta.TransferSyntaxUID if hasattr(it, "file_meta") else ExplicitVRLittleEndian
            metas.append((it, it.SOPClassUID, ts))
        else:
            ds = pydicom.dcmread(it, stop_before_pixels=True)
            metas.append((str(it), ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    ae = _ae(calling)
    contexts: dict[str, set] = {}
    for _, sop_class, ts in metas:
        contexts.setdefault(sop_class, set()).update({ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    if len(contexts) > 128:
        raise ValueError("more than 128 SOP classes in one send")
    for abstract_syntax, tss in contexts.items():
        ae.add_requested_context(abstract_syntax, sorted(tss))
    assoc = ae.associate(host, port, ae_title=called, max_pdu=0,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], tls_args=tls)
    if not assoc.is_established:
        return SendResult(0, [("*", _why_not(assoc, tls is not None))])
    sent, failed = 0, []
    try:
        for item, _, _ in metas:
            name = item if isinstance(item, str) else item.SOPInstanceUID
            try:
                st = assoc.send_c_store(item)
            except (ValueError, AttributeError, OSError) as exc:
                log.debug("C-STORE of %s failed", name, exc_info=True)
                failed.append((name, network_reason(exc, f"{called} at {host}:{port}")
                               or "could not be sent (an internal error: see the node's log at debug level)"))
                continue
            if st and st.Status in STORED:
                sent += 1
            else:
                failed.append((name, f"status 0x{st.Status:04X}" if st else "no response (timeout or abort)"))
            if not assoc.is_established:
                failed.append(("*", "association lost"))
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(sent, failed)


def dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that look like DICOM (preamble + DICM, or readable by pydicom)."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            with open(p, "rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                out.append(p)
            else:
                pydicom.dcmread(p, stop_before_pixels=True, force=False)
                out.append(p)
        except Exception:
            log.info("not DICOM, skipped: %s", p.name)
    return out


class DimseTransport:
    """C-STORE of outbox rows to a DIMSE destination: every due row on ONE association (SEG and SR of
    several jobs), and with ``storage_commitment`` each row's instances N-ACTIONed for commitment."""

    def __init__(self, calling_ae: str, db: Database, connect_timeout: float = 10.0,
                 same_association_wait: float = 2.0):
        self.calling_ae, self.db = calling_ae, db
        self.connect_timeout, self.same_association_wait = connect_timeout, same_association_wait

    def send(self, items: list[Claimed], dest: Destination,
             connected: Callable[[], None]) -> Iterator[tuple[Claimed, Outcome]]:
        assoc = self._associate(dest, items)
        connected()
        asked = False
        try:
            for it in items:
                if not assoc.is_established:
                    raise DestinationError(f"association aborted by {dest.host}:{dest.port} while sending")
                error = self._store_row(assoc, it, dest)
                if error:
                    yield it, Outcome(False, error)
                    continue
                detail = f"{len(it.files)} instances by C-STORE"
                if not dest.storage_commitment:
                    yield it, Outcome(True, detail)
                    continue
                answer = commitment.request(self.db, assoc, dest, it)
                if isinstance(answer, str):
                    yield it, Outcome(False, answer)
                else:
                    asked = True
                    yield it, Outcome(True, detail, answer)
            if asked and assoc.is_established:
                # the archive may answer on this association at once; otherwise it opens one to our listener
                threading.Event().wait(self.same_association_wait)
        finally:
            if assoc.is_established:
                assoc.release()

    def _associate(self, dest: Destination, items: list[Claimed]):
        probe(dest.host, dest.port, self.connect_timeout)
        ae = AE(ae_title=dest.calling_ae_title or self.calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 120, 60
        ae.connection_timeout = self.connect_timeout
        contexts: dict[str, set] = {}
        for it in items:
            for f in it.files:
                contexts.setdefault(f["sop_class"], set()).update({f.get("ts") or ExplicitVRLittleEndian,
                                                                  ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        for sop_class, tss in list(contexts.items())[:120]:
            ae.add_requested_context(sop_class, sorted(tss))
        roles = commitment.propose(ae) if dest.storage_commitment else []
        rejection: list = []

        def on_acse(event) -> None:
            # only an A-ASSOCIATE answer carries a rejection; an A-RELEASE has a result ("affirmative") too
            p = event.primitive
            if isinstance(p, A_ASSOCIATE) and p.result not in (None, 0):
                rejection.append((p.result, p.result_source, p.diagnostic))

        handlers: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_ACSE_RECV, on_acse),
                    (evt.EVT_N_EVENT_REPORT, commitment.on_sending_association(self.db))]
        tls = (client_context(dest), server_name(dest)) if dest.tls else None  # DICOM TLS (BCP 195)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=0, ext_neg=roles or None,
                             evt_handlers=handlers, tls_args=tls)
        if not assoc.is_established:
            if rejection:
                r = rejection[0]
                raise DestinationError(rejection_words(int(r[0]), int(r[1]),
                                                       int(getattr(r[2], "value", r[2]) or 0)))
            # pynetdicom reports a failed TLS handshake (certificate not trusted, wrong name, ours refused) as
            # an abort: say so where TLS is on
            tls_hint = (" (DICOM TLS: or the handshake failed - check tls_ca, tls_server_name and our client "
                        "certificate)") if dest.tls else ""
            if assoc.is_aborted:
                raise DestinationError(f"association aborted by {dest.host}:{dest.port} before it was accepted"
                                       + tls_hint)
            raise DestinationError(f"no answer to the association request from {dest.host}:{dest.port} "
                                   f"within {ae.acse_timeout} s")
        return assoc

    @staticmethod
    def _store_row(assoc, it: Claimed, dest: Destination) -> str:
        """C-STORE one row's files; returns what went wrong ("" when every file was stored)."""
        problems = []
        for f in it.files:
            kind = ResultFiles.kind_of(f["path"])
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
                    raise DestinationError(f"association aborted by {dest.host}:{dest.port} while sending")
                problems.append(f"{kind}: no C-STORE response (timeout)")
            elif st.Status not in STORED:
                problems.append(f"{kind}: C-STORE {status_words(st.Status)}")
        return "; ".join(problems)
