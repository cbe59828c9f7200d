"""The association acceptor: the DICOM upper layer (PS3.8) for incoming C-STORE and C-ECHO.

Why not pynetdicom's ``AE.start_server``: its acceptor runs two polling threads per association (the DUL
reactor and the association reactor each sleep 1 ms between looks at their queues), which caps one sender
at about 225 images/s on the benchmark machine against dcmtk storescp's 1100 (bench/run.py, a handler that
does nothing). Here each association is one thread that blocks in ``recv`` and answers as soon as the
handler returns, so the node is limited by its own work, the disk and the network.

Only the socket loop is ours. The standard-defined, intricate parts come from the libraries: pynetdicom
decodes the A-ASSOCIATE-RQ (with all its sub-items), negotiates presentation contexts and SCP/SCU roles
and encodes the A-ASSOCIATE-AC; pydicom writes the Part 10 file meta. What is left is framing: PDU headers,
PDV fragments, and the small implicit-VR command sets of C-STORE/C-ECHO (PS3.7 §9.3, §E). pynetdicom
remains the node's C-STORE SCU (sender.py).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID, generate_uid
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from . import __version__

log = logging.getLogger("dicom_node.acceptor")

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
#: Our implementation class UID (PS3.7 D.3.3.2), fixed for a version: derived from the name and version.
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["dicom-seg-node", __version__])
IMPLEMENTATION_VERSION = f"SEGNODE_{__version__.replace('.', '')}"[:16]
#: Largest P-DATA-TF we ask peers to send (PS3.8 D.1): a 256² 16-bit image fits in one PDU.
MAX_PDU = 1 << 20

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATASET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211


@dataclass(frozen=True)
class Peer:
    """Who is calling: what the handlers decide on."""

    calling_ae: str
    called_ae: str
    address: str
    port: int


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


class Handlers(Protocol):
    def on_requested(self, peer: Peer) -> Rejection | None: ...
    def on_echo(self, peer: Peer) -> int: ...
    def on_release(self, peer: Peer) -> None: ...
    def on_store(self, request: StoreRequest) -> int: ...


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: answered with A-ABORT (source 2, the given reason)."""

    def __init__(self, message: str, reason: int = 0x02):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------- encoding
def _ui(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_response(command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str = "") -> bytes:
    """An implicit-VR-little-endian DIMSE response command set (PS3.7 9.3, 9.1.1.2) with its group length."""
    body = _element(0x00000002, _ui(sop_class))
    body += _element(0x00000100, struct.pack("<H", command_field))
    body += _element(0x00000120, struct.pack("<H", message_id))
    body += _element(0x00000800, struct.pack("<H", NO_DATASET))
    body += _element(0x00000900, struct.pack("<H", status))
    if sop_instance:
        body += _element(0x00001000, _ui(sop_instance))
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


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF holding a whole command set as a single last fragment (PS3.8 9.3.5, E.2)."""
    return _pdu(0x04, struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command)


RELEASE_RP = _pdu(0x06, b"\x00" * 4)


def _abort(reason: int, source: int = 0x02) -> bytes:
    return _pdu(0x07, bytes((0, 0, source, reason)))


def _reject(r: Rejection) -> bytes:
    return _pdu(0x03, bytes((0, r.result, r.source, r.reason)))


# --------------------------------------------------------------------------------------------- association
class _Association:
    """One accepted connection, served in its own thread from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, acceptor: "Acceptor", sock: socket.socket, address: tuple[str, int]):
        self.acceptor = acceptor
        self.sock = sock
        self.address = address
        self.peer: Peer | None = None
        self.contexts: dict[int, PresentationContext] = {}
        self._command = bytearray()
        self._data: list[memoryview] = []
        self._cmd: dict[int, bytes] | None = None
        self._context_id = 0

    # reading --------------------------------------------------------------------------------
    def _recv_exact(self, n: int) -> memoryview:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionResetError("peer closed the connection")
            got += k
        return view

    def _read_pdu(self) -> tuple[int, memoryview]:
        head = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02x}", 0x01)
        if length > self.acceptor.max_pdu + 4096:
            raise ProtocolError(f"PDU of {length} bytes exceeds our maximum of {self.acceptor.max_pdu}", 0x06)
        return pdu_type, self._recv_exact(length)

    # serving --------------------------------------------------------------------------------
    def serve(self) -> None:
        sock = self.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("TCP_NODELAY not set: %s", exc)
        sock.settimeout(self.acceptor.network_timeout)
        try:
            pdu_type, body = self._read_pdu()
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
            if not self._associate(body):
                return
            try:
                self._serve_established()
            finally:
                self.acceptor._leave()
        except ProtocolError as exc:
            log.warning("association with %s aborted: %s", self.address[0], exc)
            self._send_quietly(_abort(exc.reason))
        except socket.timeout:
            log.warning("association with %s aborted: no data for %s s (scp.network_timeout)",
                        self.address[0], self.acceptor.network_timeout)
            self._send_quietly(_abort(0x00))
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s closed: %s", self.address[0], exc)

    def _serve_established(self) -> None:
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == 0x04:
                self._on_p_data(body)
            elif pdu_type == 0x05:  # A-RELEASE-RQ: the handlers may finish work before we confirm
                self.acceptor.handlers.on_release(self.peer)
                self.sock.sendall(RELEASE_RP)
                return
            elif pdu_type == 0x07:  # A-ABORT from the peer
                log.info("association with %s aborted by the peer", self.address[0])
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} on an established association")

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    # association negotiation ----------------------------------------------------------------
    def _associate(self, body: memoryview) -> bool:
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(struct.pack(">BBI", 0x01, 0, len(body)) + bytes(body))
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}", 0x06) from None
        peer = Peer(calling_ae=str(primitive.calling_ae_title or "").strip(),
                    called_ae=str(primitive.called_ae_title or "").strip(),
                    address=self.address[0], port=self.address[1])
        self.peer = peer
        rejection = self.acceptor.handlers.on_requested(peer)
        if rejection is None and not self.acceptor._enter():
            log.warning("association from %s rejected: %s associations already open (scp.max_associations)",
                        peer.address, self.acceptor.max_associations)
            rejection = Rejection(0x02, 0x03, 0x02)  # transient, provider (presentation), local limit exceeded
        if rejection is not None:
            self.sock.sendall(_reject(rejection))
            return False
        try:
            items = primitive.user_information or []
            roles = {i.sop_class_uid: (i.scu_role, i.scp_role) for i in items
                     if isinstance(i, SCP_SCU_RoleSelectionNegotiation)}
            results, ac_roles = negotiate_as_acceptor(
                primitive.presentation_context_definition_list, self.acceptor.contexts, roles)
            self.contexts = {cx.context_id: cx for cx in results if cx.result == 0x00}
            ac = A_ASSOCIATE()
            ac.application_context_name = APPLICATION_CONTEXT
            ac.calling_ae_title = primitive.calling_ae_title
            ac.called_ae_title = primitive.called_ae_title
            ac.result = 0x00
            ac.result_source = 0x01
            ac.presentation_context_definition_results_list = results
            max_len = MaximumLengthNotification()
            max_len.maximum_length_received = self.acceptor.max_pdu
            impl = ImplementationClassUIDNotification()
            impl.implementation_class_uid = IMPLEMENTATION_UID
            name = ImplementationVersionNameNotification()
            name.implementation_version_name = IMPLEMENTATION_VERSION
            ac.user_information = [max_len, impl, name, *ac_roles]
            pdu = A_ASSOCIATE_AC()
            pdu.from_primitive(ac)
            encoded = pdu.encode()
        except Exception:
            self.acceptor._leave()
            raise
        try:
            self.sock.sendall(encoded)
        except Exception:
            self.acceptor._leave()
            raise
        return True

    # data transfer ---------------------------------------------------------------------------
    def _on_p_data(self, body: memoryview) -> None:
        i, n = 0, len(body)
        while i < n:
            if i + 6 > n:
                raise ProtocolError("truncated PDV item", 0x06)
            length, context_id, control = struct.unpack_from(">IBB", body, i)
            if length < 2 or i + 4 + length > n:
                raise ProtocolError("PDV item length outside its PDU", 0x06)
            fragment = body[i + 6:i + 4 + length]
            i += 4 + length
            if context_id not in self.contexts:
                raise ProtocolError(f"data on presentation context {context_id}, which was not accepted", 0x06)
            if control & 0x01:  # command fragment
                if self._cmd is not None:
                    raise ProtocolError("a new command arrived before the last one's data set", 0x02)
                self._command += fragment
                if control & 0x02:
                    self._cmd = parse_command(bytes(self._command))
                    self._command.clear()
                    self._context_id = context_id
                    if _us(self._cmd, 0x00000800, NO_DATASET) == NO_DATASET:
                        self._dispatch(None)
            else:
                if self._cmd is None:
                    raise ProtocolError("data set fragment without a command", 0x02)
                self._data.append(fragment)
                if control & 0x02:
                    data = self._data[0].tobytes() if len(self._data) == 1 else b"".join(self._data)
                    self._data = []
                    self._dispatch(data)

    def _dispatch(self, data: bytes | None) -> None:
        cmd, self._cmd = self._cmd, None
        context_id = self._context_id
        assert cmd is not None and self.peer is not None
        field = _us(cmd, 0x00000100)
        message_id = _us(cmd, 0x00000110)
        sop_class = _uid(cmd, 0x00000002)
        if field == C_STORE_RQ and data is not None:
            sop_instance = _uid(cmd, 0x00001000)
            request = StoreRequest(peer=self.peer, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                   transfer_syntax=str(self.contexts[context_id].transfer_syntax[0]), dataset=data)
            status = self.acceptor.handlers.on_store(request)
            response = encode_response(0x8001, message_id, status, sop_class, sop_instance)
        elif field == C_ECHO_RQ:
            status = self.acceptor.handlers.on_echo(self.peer)
            response = encode_response(0x8030, message_id, status, sop_class)
        else:
            log.warning("DIMSE command 0x%04x from %s not supported here: answered 0x0211", field, self.peer.address)
            response = encode_response(field | 0x8000, message_id, UNRECOGNIZED_OPERATION, sop_class)
        self.sock.sendall(_p_data(context_id, response))


# --------------------------------------------------------------------------------------------- server
class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class Acceptor:
    """Listens on a port and serves each association in its own thread."""

    def __init__(self, contexts: list[PresentationContext], handlers: Handlers, max_associations: int = 16,
                 network_timeout: float = 60, max_pdu: int = MAX_PDU):
        self.contexts = contexts
        self.handlers = handlers
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.max_pdu = max_pdu
        self._active = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _enter(self) -> bool:
        with self._lock:
            if self._active >= self.max_associations:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def start(self, address: tuple[str, int]) -> None:
        acceptor = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with acceptor._lock:
                    acceptor._sockets.add(self.request)
                try:
                    _Association(acceptor, self.request, self.client_address).serve()
                except Exception:  # one connection must never take the listener down
                    log.exception("association from %s failed", self.client_address[0])
                finally:
                    with acceptor._lock:
                        acceptor._sockets.discard(self.request)

        self._server = _Server(address, _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="dicom-acceptor", daemon=True)
        self._thread.start()

    @property
    def server_address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[:2]

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop listening and cut open associations (peers see the connection close and resend later)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None
