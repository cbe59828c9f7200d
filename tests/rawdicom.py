"""A deliberately bare DICOM upper-layer client for hostile tests: it sends exactly the bytes a test asks for
(malformed PDUs, trickled requests, C-STOREs whose command and data set disagree), which no well-behaved SCU
(dcmtk, pynetdicom) can be made to do. Only for tests."""

from __future__ import annotations

import io
import socket
import struct
import time

import pydicom
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def associate_rq(called: str = "SEGNODE", calling: str = "HOSTILE",
                 abstract_syntaxes: tuple[str, ...] = (VERIFICATION,), transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing each abstract syntax with one transfer syntax."""
    p = A_ASSOCIATE()
    p.application_context_name = "1.2.840.10008.3.1.1.1"
    p.calling_ae_title = calling
    p.called_ae_title = called
    contexts = []
    for i, abstract in enumerate(abstract_syntaxes):
        cx = build_context(abstract, [transfer_syntax])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    p.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 65536
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    p.user_information = [ml, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(p)
    return pdu.encode()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    """A TCP connection to the node from ``source`` (any 127.x.y.z address works on Linux loopback)."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def read_pdu(s: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None if the node closed the connection."""
    head = _recv(s, 6)
    if head is None:
        return None
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = _recv(s, length)
    return (pdu_type, body) if body is not None else None


def _recv(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closed (or aborted) the connection, reading whatever it sent; None if it did not."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0
    return None


def accepted_contexts(ac_body: bytes) -> dict[str, int]:
    """abstract syntax → context id of the accepted contexts, from an A-ASSOCIATE-AC body."""
    pdu = A_ASSOCIATE_AC()
    pdu.decode(struct.pack(">BBI", 0x02, 0, len(ac_body)) + ac_body)
    prim = pdu.to_primitive()
    return {str(cx.abstract_syntax): cx.context_id for cx in prim.presentation_context_definition_results_list
            if cx.result == 0}


def associate(port: int, abstract_syntaxes: tuple[str, ...], called: str = "SEGNODE",
              source: str = "127.0.0.1", transfer_syntax: str = EXPLICIT_LE) -> tuple[socket.socket, dict[int, str]]:
    """An established association: (socket, {context id: abstract syntax proposed})."""
    s = connect(port, source)
    s.sendall(associate_rq(called, abstract_syntaxes=abstract_syntaxes, transfer_syntax=transfer_syntax))
    pdu = read_pdu(s)
    assert pdu is not None and pdu[0] == 0x02, f"association not accepted: {pdu}"
    return s, {2 * i + 1: a for i, a in enumerate(abstract_syntaxes)}


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _ui(v: str) -> bytes:
    b = v.encode("latin-1")
    return b + b"\x00" if len(b) % 2 else b


def c_store_command(sop_class: str | None, sop_instance: str | None, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR LE); ``None`` leaves a required field out."""
    body = b""
    if sop_class is not None:
        body += _element(0x00000002, _ui(sop_class))
    body += _element(0x00000100, struct.pack("<H", 0x0001))
    body += _element(0x00000110, struct.pack("<H", message_id))
    body += _element(0x00000700, struct.pack("<H", 0))
    body += _element(0x00000800, struct.pack("<H", 0x0000))
    if sop_instance is not None:
        body += _element(0x00001000, _ui(sop_instance))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, payload: bytes, command: bool) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, 0x03 if command else 0x02) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    """The data set encoded in Explicit VR Little Endian, without preamble or file meta."""
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_len = struct.unpack_from("<I", raw, 132 + 8)[0]
    return raw[132 + 12 + meta_len:]


def c_store(s: socket.socket, context_id: int, sop_class: str | None, sop_instance: str | None,
            data: bytes, fragment: int = 0) -> int | None:
    """Send one C-STORE and return the response status (None: the node closed or aborted instead).
    ``fragment``: the data set in P-DATA-TFs of at most this many bytes (0: one PDU)."""
    s.sendall(p_data(context_id, c_store_command(sop_class, sop_instance), True))
    step = fragment or max(len(data), 1)
    for at in range(0, max(len(data), 1), step):
        part = data[at:at + step]
        last = at + step >= len(data)
        pdv = struct.pack(">IBB", len(part) + 2, context_id, 0x02 if last else 0x00) + part
        s.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    pdu = read_pdu(s)
    if pdu is None or pdu[0] != 0x04:
        return None
    command = pdu[1][6:]
    i = 0
    while i + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, i)
        if (group, elem) == (0x0000, 0x0900):
            return struct.unpack_from("<H", command, i + 8)[0]
        i += 8 + length
    return None


def release(s: socket.socket) -> bool:
    s.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4)
    pdu = read_pdu(s)
    s.close()
    return pdu is not None and pdu[0] == 0x06
