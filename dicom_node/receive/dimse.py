"""DIMSE on an established association: the C-STORE, C-ECHO and N-EVENT-REPORT command sets (PS3.7 §9.3,
§10.3.1), what a handler is told about a request, and the answer it gives. What an event report means
(Storage Commitment) is the handler's business, registered by the service.

The upper layer (:mod:`.acceptor`) frames PDUs and assembles each message's command set and data set; this
module reads the command, calls the handler and encodes the response command set. Kept apart so that the
rules about *what* a message may ask (fields, SOP classes) live in one place, away from the socket loop.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydicom.uid import generate_uid

from .. import __version__
from .uids import is_uid, uid_problem

if TYPE_CHECKING:
    from storage.instances import InstanceMeta

log = logging.getLogger("dicom_node.receive.dimse")

#: Our implementation class UID (PS3.7 D.3.3.2), fixed for a version: derived from the name and version.
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["dicom-seg-node", __version__])
IMPLEMENTATION_VERSION = f"SEGNODE_{__version__.replace('.', '')}"[:16]

C_STORE_RQ, C_ECHO_RQ, N_EVENT_REPORT_RQ = 0x0001, 0x0030, 0x0100
NO_DATASET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211

# Statuses the node answers (PS3.4 B.2.3 for C-STORE, PS3.7 C for the general ones).
SUCCESS = 0x0000
#: "Warning: Coercion of Data Elements": the instance the node holds under this SOP Instance UID is not the one
#: just sent (a conflicting re-send under ``scp.duplicate_policy = "keep"``). A warning is a success to the
#: sender (it must not retry), unlike 0x0111 "Duplicate SOP Instance", a failure.
KEPT_FIRST_COPY = 0xB000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
#: "Error: Data Set does not match SOP Class".
DATASET_MISMATCH = 0xA900
#: "Refused: SOP Class not supported" (the command's class is not its presentation context's).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: N-EVENT-REPORT "No such SOP Instance", for a class nobody here handles.
NO_SUCH_SOP_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Peer:
    """Who is calling: what the handlers decide on."""

    calling_ae: str
    called_ae: str
    address: str
    port: int
    tls: bool = False  # came over the TLS listener


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason."""

    result: int
    source: int
    reason: int


@dataclass
class StoreRequest:
    """One received C-STORE: the dataset exactly as it came over the wire, in the context's transfer syntax."""

    peer: Peer
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes
    #: The abstract syntax of the presentation context it came on (PS3.7 9.3.1.1: must be its SOP class).
    context_sop_class: str = ""
    #: Bytes of a data set larger than the acceptor keeps (``dataset`` is then empty): read, not held.
    oversize: int = 0

    def as_file(self) -> bytes:
        """The instance as a DICOM Part 10 file (preamble, file meta, data set), without re-encoding the data set."""
        return file_preamble(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax,
                             self.peer.calling_ae) + self.dataset


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    b = value.encode("ascii", "replace")
    return b + pad if len(b) % 2 else b


def file_preamble(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """Preamble, "DICM" and the file meta group (PS3.10 7.1), explicit VR little endian.

    Written by hand because pydicom's general writer costs ~0.5 ms per instance, a third of the node's
    whole per-instance budget; the group is fixed and small. Tests read it back with pydicom and dcmtk.
    """
    body = _explicit(0x00020001, b"OB", b"\x00\x01")
    body += _explicit(0x00020002, b"UI", _padded(sop_class, b"\x00"))
    body += _explicit(0x00020003, b"UI", _padded(sop_instance, b"\x00"))
    body += _explicit(0x00020010, b"UI", _padded(transfer_syntax, b"\x00"))
    body += _explicit(0x00020012, b"UI", _padded(IMPLEMENTATION_UID, b"\x00"))
    body += _explicit(0x00020013, b"SH", _padded(IMPLEMENTATION_VERSION, b" "))
    if source_ae:
        body += _explicit(0x00020016, b"AE", _padded(source_ae[:16], b" "))
    return b"\x00" * 128 + b"DICM" + _explicit(0x00020000, b"UL", struct.pack("<I", len(body))) + body


@dataclass
class EventReport:
    """One received N-EVENT-REPORT: its SOP class and instance, event type and the still encoded Event
    Information (None when the request carried none)."""

    peer: Peer
    sop_class_uid: str
    sop_instance_uid: str
    event_type: int
    data: bytes | None
    transfer_syntax: str

    def information(self):
        """The Event Information as a pydicom Dataset (raises on undecodable data)."""
        from io import BytesIO

        from pydicom.filereader import read_dataset

        ts = self.transfer_syntax
        return read_dataset(BytesIO(self.data or b""), is_implicit_VR=ts == "1.2.840.10008.1.2",
                            is_little_endian=ts != "1.2.840.10008.1.2.2")


class Handlers(Protocol):
    def on_requested(self, peer: Peer) -> Rejection | None: ...
    def on_echo(self, peer: Peer) -> int: ...
    def on_release(self, peer: Peer, stored: bool) -> None: ...
    def on_closed(self, peer: Peer) -> None: ...
    def on_store(self, request: StoreRequest) -> int: ...
    def on_event_report(self, report: EventReport) -> int: ...
    def on_aborted(self, peer: Peer, how: str) -> None: ...  # established, then ended without A-RELEASE


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: answered with A-ABORT (source 2, the given reason)."""

    def __init__(self, message: str, reason: int = 0x02):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------- C-STORE checks
def command_problem(req: StoreRequest) -> tuple[int, str] | None:
    """What is wrong with a C-STORE's command (status, reason in words), or None: the required command fields
    (PS3.7 9.3.1.1) are present and valid UIDs, and the SOP class is its presentation context's."""
    why = (uid_problem("Affected SOP Class UID", req.sop_class_uid)
           or uid_problem("Affected SOP Instance UID", req.sop_instance_uid))
    if why:
        return CANNOT_UNDERSTAND, f"C-STORE command: {why}"
    if req.context_sop_class and req.sop_class_uid != req.context_sop_class:
        return SOP_CLASS_NOT_SUPPORTED, (f"C-STORE command's SOP class {req.sop_class_uid} differs from its "
                                         f"presentation context's {req.context_sop_class}")
    return None


def dataset_problem(req: StoreRequest, meta: InstanceMeta) -> tuple[int, str] | None:
    """What is wrong with a readable data set against its command, or None (UIDs become file names)."""
    if meta.sop_uid != req.sop_instance_uid:
        return CANNOT_UNDERSTAND, "SOP Instance UID in the dataset differs from the C-STORE request"
    if meta.sop_class_uid != req.sop_class_uid:
        shown = f" ({meta.sop_class_uid})" if is_uid(meta.sop_class_uid) else ""  # never echo arbitrary text
        return DATASET_MISMATCH, (f"SOP Class UID in the dataset{shown} differs from the C-STORE request's "
                                  f"({req.sop_class_uid})")
    why = (uid_problem("Study Instance UID", meta.study_uid) or uid_problem("Series Instance UID", meta.series_uid))
    return (CANNOT_UNDERSTAND, why) if why else None


# --------------------------------------------------------------------------------------------- encoding
def _ui(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_response(command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str = "",
                    event_type: int | None = None) -> bytes:
    """An implicit-VR-little-endian DIMSE response command set (PS3.7 9.3, 9.1.1.2) with its group length."""
    body = _element(0x00000002, _ui(sop_class))
    body += _element(0x00000100, struct.pack("<H", command_field))
    body += _element(0x00000120, struct.pack("<H", message_id))
    body += _element(0x00000800, struct.pack("<H", NO_DATASET))
    body += _element(0x00000900, struct.pack("<H", status))
    if sop_instance:
        body += _element(0x00001000, _ui(sop_instance))
    if event_type is not None:
        body += _element(0x00001002, struct.pack("<H", event_type))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def parse_command(raw: bytes) -> dict[int, bytes]:
    """Elements of an implicit-VR-little-endian command set, by tag; values still encoded."""
    out: dict[int, bytes] = {}
    i, n = 0, len(raw)
    while i + 8 <= n:
        group, elem, length = struct.unpack_from("<HHI", raw, i)
        i += 8
        if length == 0xFFFFFFFF or i + length > n:
            raise ProtocolError("malformed DIMSE command set", 0x06)
        out[(group << 16) | elem] = raw[i:i + length]
        i += length
    return out


def _uid(cmd: dict[int, bytes], tag: int) -> str:
    return cmd.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _us(cmd: dict[int, bytes], tag: int, default: int = 0) -> int:
    v = cmd.get(tag)
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else default


def dispatch(handlers: Handlers, peer: Peer, cmd: dict[int, bytes], transfer_syntax: str,
             data: bytes | None, abstract_syntax: str = "", oversize: int = 0) -> bytes:
    """Serve one complete DIMSE message; returns the response command set to send on the same context.

    ``oversize``: the message's data set was larger than the acceptor keeps and was read without being held
    (``data`` is empty); a C-STORE's handler answers it, any other message fails here."""
    field = _us(cmd, 0x00000100)
    message_id = _us(cmd, 0x00000110)
    sop_class = _uid(cmd, 0x00000002)
    if field == C_STORE_RQ and data is not None:
        sop_instance = _uid(cmd, 0x00001000)
        request = StoreRequest(peer=peer, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                               transfer_syntax=transfer_syntax, dataset=data, context_sop_class=abstract_syntax,
                               oversize=oversize)
        status = handlers.on_store(request)
        return encode_response(0x8001, message_id, status, sop_class, sop_instance)
    if oversize:
        log.warning("DIMSE command 0x%04x from %s carried a data set of %d MB, more than is kept: answered 0x%04x",
                    field, peer.address, oversize >> 20, PROCESSING_FAILURE)
        return encode_response(field | 0x8000, message_id, PROCESSING_FAILURE, sop_class, _uid(cmd, 0x00001000))
    if field == C_ECHO_RQ:
        status = handlers.on_echo(peer)
        return encode_response(0x8030, message_id, status, sop_class)
    if field == N_EVENT_REPORT_RQ:
        return _event_report(handlers, peer, cmd, message_id, sop_class, transfer_syntax, data)
    log.warning("DIMSE command 0x%04x from %s not supported here: answered 0x0211", field, peer.address)
    return encode_response(field | 0x8000, message_id, UNRECOGNIZED_OPERATION, sop_class)


def _event_report(handlers: Handlers, peer: Peer, cmd: dict[int, bytes], message_id: int, sop_class: str,
                  transfer_syntax: str, data: bytes | None) -> bytes:
    """N-EVENT-REPORT-RQ, answered with N-EVENT-REPORT-RSP (0x8100) and the handler's status."""
    sop_instance = _uid(cmd, 0x00001000)
    event_type = _us(cmd, 0x00001002)
    status = handlers.on_event_report(EventReport(peer, sop_class, sop_instance, event_type, data, transfer_syntax))
    return encode_response(0x8100, message_id, status, sop_class, sop_instance, event_type)
