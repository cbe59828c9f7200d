"""The association acceptor: the DICOM upper layer (PS3.8) for incoming C-STORE and C-ECHO.

Why not pynetdicom's ``AE.start_server``: its acceptor runs two polling threads per association (the DUL
reactor and the association reactor each sleep 1 ms between looks at their queues), which caps one sender
at about 225 images/s on the benchmark machine against dcmtk storescp's 1100 (bench/run.py, a handler that
does nothing). Here each association is one thread that blocks in ``recv`` and answers as soon as the
handler returns, so the node is limited by its own work, the disk and the network.

Only the socket loop is ours. The standard-defined, intricate parts come from the libraries: pynetdicom
decodes the A-ASSOCIATE-RQ (with all its sub-items), negotiates presentation contexts and SCP/SCU roles
and encodes the A-ASSOCIATE-AC; pydicom writes the Part 10 file meta. What is left is framing: PDU headers,
PDV fragments (PS3.8 §E); the DIMSE command sets are read and answered in :mod:`.dimse`. pynetdicom
remains the node's C-STORE SCU (deliver/sender.py).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from .dimse import (IMPLEMENTATION_UID, IMPLEMENTATION_VERSION, NO_DATASET, Handlers, Peer, ProtocolError,
                    Rejection, _us, dispatch, parse_command)

log = logging.getLogger("dicom_node.receive.acceptor")

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
#: Largest P-DATA-TF we ask peers to send (PS3.8 D.1): a 256² 16-bit image fits in one PDU.
MAX_PDU = 1 << 20


# --------------------------------------------------------------------------------------------- framing
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
            how = "dropped"
            try:
                how = self._serve_established()
            finally:
                self.acceptor._leave()
                if how != "released":
                    self.acceptor.handlers.on_aborted(self.peer, how)
        except ProtocolError as exc:
            log.warning("association with %s aborted: %s", self.address[0], exc)
            self._send_quietly(_abort(exc.reason))
        except socket.timeout:
            log.warning("association with %s aborted: no data for %s s (scp.network_timeout)",
                        self.address[0], self.acceptor.network_timeout)
            self._send_quietly(_abort(0x00))
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s closed: %s", self.address[0], exc)

    def _serve_established(self) -> str:
        """Serve until the association ends: "released", or "aborted" (A-ABORT from the peer)."""
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == 0x04:
                self._on_p_data(body)
            elif pdu_type == 0x05:  # A-RELEASE-RQ: the handlers may finish work before we confirm
                self.acceptor.handlers.on_release(self.peer)
                self.sock.sendall(RELEASE_RP)
                return "released"
            elif pdu_type == 0x07:  # A-ABORT from the peer
                log.info("association with %s aborted by the peer", self.address[0])
                return "aborted"
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
        response = dispatch(self.acceptor.handlers, self.peer, cmd,
                            str(self.contexts[context_id].transfer_syntax[0]), data)
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
