"""Sending DICOM: the node's C-STORE and C-ECHO SCU (results to destinations, and ``dicom-node send``/``echo``).

One association per batch of files, TCP_NODELAY on the socket, every presentation context the files need.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import network_reason


log = logging.getLogger("dicom_node.deliver.sender")


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN (pynetdicom, when we send): disable Nagle, or every small PDU waits ~40 ms for the
    peer's delayed ACK."""
    try:
        sock = event.assoc.dul.socket.socket
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
    metas = []
    for it in items:
        if isinstance(it, pydicom.Dataset):
            metas.append((it, it.SOPClassUID, it.file_meta.TransferSyntaxUID if hasattr(it, "file_meta") else ExplicitVRLittleEndian))
        else:
            ds = pydicom.dcmread(it, stop_before_pixels=True)
            metas.append((str(it), ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    ae = _ae(calling)
    contexts: dict[str, set] = {}
    for _, sop_class, ts in metas:
        contexts.setdefault(sop_class, set()).update({ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    if len(contexts) > 128:
        raise ValueError("more than 128 SOP classes in one send")
    for sop_class, tss in contexts.items():
        ae.add_requested_context(sop_class, sorted(tss))
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
            if st and st.Status in (0x0000, 0xB000, 0xB007, 0xB006):
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


def stow(url: str, files: list[str], username: str = "", password: str = "") -> SendResult:
    """DICOMweb STOW-RS of the files to ``url`` (the server's DICOMweb root), via dicomweb-client."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(username, password) if username else None
    client = DICOMwebClient(url=url, session=session)
    datasets = [pydicom.dcmread(f) for f in files]
    try:
        resp = client.store_instances(datasets)
    except Exception as exc:  # HTTP errors, refused connections: in words; the exception at debug level
        log.debug("STOW-RS to %s failed", url, exc_info=True)
        return SendResult(0, [("*", network_reason(exc, url) or f"the upload to {url} failed (see the node's log "
                                                                 "at debug level)")])
    failed = [(str(item.get("00081155", {}).get("Value", ["?"])[0]), "refused by the server")
              for item in (resp.get("00081198", {}).get("Value", []) if resp is not None else [])]
    return SendResult(len(datasets) - len(failed), failed)
