"""The association acceptor: the DICOM upper layer (PS3.8) for incoming C-STORE and C-ECHO.

Why not pynetdicom's ``AE.start_server``: its acceptor runs two polling threads per association (the DUL
reactor and the association reactor each sleep 1 ms between looks at their queues), which caps one sender
at about 225 images/s on the benchmark machine against dcmtk storescp's 1100 (bench/run.py, a handler that
does nothing). Here each association is one thread that blocks in ``recv`` and answers as soon as the
handler returns, so the node is limited by its own work, the disk and the network.

Hostile peers (PS3.8's ARTIM timer, issue 12): the A-ASSOCIATE-RQ must arrive whole within
``association_request_timeout`` of connect (TLS handshake included), every later PDU whole within
``network_timeout`` (a deadline for the whole PDU, so trickling a byte at a time does not keep a slot); the
peer-address allowlist and a hard cap on open connections are applied when the connection is accepted, before
a byte is read or a thread is started; one address may hold at most ``max_associations_per_peer`` of the
``max_associations`` slots. Every drop is logged once, with the peer address and the reason.

Only the socket loop is ours. The standard-defined, intricate parts come from the libraries: pynetdicom
decodes the A-ASSOCIATE-RQ (with all its sub-items), negotiates presentation contexts and SCP/SCU roles
and encodes the A-ASSOCIATE-AC; pydicom writes the Part 10 file meta. What is left is framing: PDU headers,
PDV fragments (PS3.8 §E); the DIMSE command sets are read and answered in :mod:`.dimse`. pynetdicom
remains the node's C-STORE SCU (deliver/sender.py).
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter

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

from .dimse import (C_STORE_RQ, IMPLEMENTATION_UID, IMPLEMENTATION_VERSION, NO_DATASET, Handlers, Peer,
                    ProtocolError, Rejection, _us, dispatch, parse_command)

log = logging.getLogger("dicom_node.receive.acceptor")

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
#: Largest P-DATA-TF we ask peers to send (PS3.8 D.1): a 256² 16-bit image fits in one PDU.
MAX_PDU = 1 << 20
#: Largest A-ASSOCIATE-RQ we read. 128 presentation contexts with a dozen transfer syntaxes each are ~50 KB;
#: without a bound, a caller announcing 1 MB requests makes every connection cost a megabyte.
MAX_ASSOCIATE_RQ = 256 * 1024
#: Bytes read at a time while an A-ASSOCIATE-RQ arrives: memory grows with what was received, not announced.
_CHUNK = 16 * 1024


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
class Dropped(Exception):
    """The connection is closed without an answer (deadline passed); the message is the logged reason."""


#: PS3.8 9.3.4 A-ASSOCIATE-RJ (result, source, reason) for what we refuse during negotiation.
NO_PRESENTATION_CONTEXT = Rejection(0x01, 0x01, 0x01)  # permanent, service-user, no reason given
APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(0x01, 0x01, 0x02)
PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(0x01, 0x02, 0x02)  # permanent, service-provider (ACSE)
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02)  # transient, service-provider (presentation)


class _Association:
    """One accepted connection, served in its own thread from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, acceptor: "Acceptor", sock: socket.socket, address: tuple[str, int], accepted_at: float,
                 tls: ssl.SSLContext | None = None):
        self.acceptor = acceptor
        self.sock = sock
        self.address = address
        self.accepted_at = accepted_at
        self.tls = tls
        self.peer: Peer | None = None
        self.stored = False  # any C-STORE on this association (only then does release wait for the database)
        self.contexts: dict[int, PresentationContext] = {}
        self._syntaxes: dict[int, tuple[str, str]] = {}  # context id → (transfer syntax, abstract syntax)
        self._command = bytearray()
        self._data: list[memoryview] = []
        self._cmd: dict[int, bytes] | None = None
        self._context_id = 0
        self._timeout = float("inf")  # the socket's current timeout (see _fill)

    # reading --------------------------------------------------------------------------------
    def _recv_exact(self, n: int, deadline: float, what: str, grow: bool = False) -> memoryview:
        """``n`` bytes, all before ``deadline`` (monotonic). With ``grow`` (a caller not yet associated) they are
        read in chunks, so that memory follows the bytes that actually arrived, not the length announced; an
        established association's PDUs (at most max_pdu) are read into one buffer, the fast path."""
        if not grow or n <= _CHUNK:
            buf = bytearray(n)
            self._fill(memoryview(buf), deadline, what)
            return memoryview(buf)
        parts: list[bytearray] = []
        left = n
        while left:
            part = bytearray(min(left, _CHUNK))
            self._fill(memoryview(part), deadline, what)
            parts.append(part)
            left -= len(part)
        return memoryview(b"".join(parts))

    def _fill(self, view: memoryview, deadline: float, what: str) -> None:
        """Fill ``view`` before ``deadline``. The socket's timeout is lowered only when it would overshoot the
        deadline by more than a quarter second (settimeout is a system call; on the hot path a PDU arrives
        in a few reads well within the deadline); a timeout before the deadline just re-arms it."""
        sock = self.sock
        got, n = 0, len(view)
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Dropped(what)
            if self._timeout > remaining + 0.25:
                sock.settimeout(remaining)
                self._timeout = remaining
            try:
                k = sock.recv_into(view[got:], n - got)
            except (socket.timeout, ssl.SSLWantReadError):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Dropped(what) from None
                sock.settimeout(remaining)
                self._timeout = remaining
                continue
            if k == 0:
                raise ConnectionResetError("peer closed the connection")
            got += k

    def _read_pdu(self, deadline: float, what: str, limit: int, grow: bool = False) -> tuple[int, memoryview]:
        head = self._recv_exact(6, deadline, what)
        pdu_type, _, length = struct.unpack(">BBI", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            hint = " (a TLS handshake on the plain port?)" if pdu_type == 0x16 else ""
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02x}{hint}", 0x01)
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds our maximum of {limit}", 0x06)
        return pdu_type, self._recv_exact(length, deadline, what, grow)

    # serving --------------------------------------------------------------------------------
    def serve(self) -> None:
        acc = self.acceptor
        where = self.address[0]
        try:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.debug("TCP_NODELAY not set: %s", exc)
            artim = self.accepted_at + acc.association_request_timeout
            if self.tls is not None:
                self._handshake(artim)
            pdu_type, body = self._read_pdu(artim, f"no complete A-ASSOCIATE-RQ within {acc.association_request_timeout:g} s "
                                            "of connect (scp.association_request_timeout)", MAX_ASSOCIATE_RQ, grow=True)
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
            if not self._associate(body):
                return
            how = "dropped"
            try:
                how = self._serve_established()
            finally:
                acc._leave(where)
                if self.peer is not None:
                    if how != "released":  # A-ABORT or a dropped connection: a resend is likely
                        acc.handlers.on_aborted(self.peer, how)
                    acc.handlers.on_closed(self.peer)
        except ProtocolError as exc:
            acc.dropped(where, f"aborted: {exc}")
            self._send_quietly(_abort(exc.reason))
        except Dropped as exc:
            acc.dropped(where, f"dropped: {exc}")
            self._send_quietly(_abort(0x00))
        except ssl.SSLError as exc:
            acc.dropped(where, f"TLS refused: {exc.reason or exc}")
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s closed: %s", where, exc)

    def _handshake(self, deadline: float) -> None:
        """The TLS handshake, on a non-blocking socket so that the ARTIM deadline bounds it as a whole."""
        assert self.tls is not None
        raw = self.sock
        raw.setblocking(False)
        tls_sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self.sock = tls_sock
        while True:
            try:
                tls_sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                wait = select.select([tls_sock], [], [], max(0.0, deadline - time.monotonic()))
            except ssl.SSLWantWriteError:
                wait = select.select([], [tls_sock], [], max(0.0, deadline - time.monotonic()))
            if not any(wait):
                raise Dropped(f"no TLS handshake within {self.acceptor.association_request_timeout:g} s of connect "
                              "(scp.association_request_timeout)")
        tls_sock.setblocking(True)
        self._timeout = float("inf")

    def _serve_established(self) -> str:
        """Serve until the association ends: "released", or "aborted" (A-ABORT from the peer)."""
        acc = self.acceptor
        timeout = acc.network_timeout
        what = f"no complete PDU within {timeout:g} s (scp.network_timeout)"
        limit = acc.max_pdu + 4096
        while True:
            pdu_type, body = self._read_pdu(time.monotonic() + timeout, what, limit)
            if pdu_type == 0x04:
                self._on_p_data(body)
            elif pdu_type == 0x05:  # A-RELEASE-RQ: the handlers may finish work before we confirm
                acc.handlers.on_release(self.peer, self.stored)
                self._set_timeout(timeout)
                self.sock.sendall(RELEASE_RP)
                return "released"
            elif pdu_type == 0x07:  # A-ABORT from the peer
                log.info("association with %s aborted by the peer", self.address[0])
                return "aborted"
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} on an established association")

    def _set_timeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        self._timeout = seconds

    def _send_quietly(self, data: bytes) -> None:
        try:
            self._set_timeout(2)
            self.sock.sendall(data)
        except (OSError, ValueError):
            pass

    # association negotiation ----------------------------------------------------------------
    def _associate(self, body: memoryview) -> bool:
        acc = self.acceptor
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(struct.pack(">BBI", 0x01, 0, len(body)) + bytes(body))
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}", 0x06) from None
        peer = Peer(calling_ae=str(primitive.calling_ae_title or "").strip(),
                    called_ae=str(primitive.called_ae_title or "").strip(),
                    address=self.address[0], port=self.address[1], tls=self.tls is not None)
        self.peer = peer
        rejection, why = None, ""
        if not (rq.protocol_version & 0x01):
            rejection, why = PROTOCOL_VERSION_NOT_SUPPORTED, f"protocol version {rq.protocol_version} not supported"
        elif str(primitive.application_context_name) != APPLICATION_CONTEXT:
            rejection, why = APPLICATION_CONTEXT_NOT_SUPPORTED, "application context is not the DICOM one"
        if rejection is None:
            rejection = acc.handlers.on_requested(peer)  # logs its own reason
        results: list = []
        ac_roles: list = []
        if rejection is None:
            items = primitive.user_information or []
            roles = {i.sop_class_uid: (i.scu_role, i.scp_role) for i in items
                     if isinstance(i, SCP_SCU_RoleSelectionNegotiation)}
            results, ac_roles = negotiate_as_acceptor(primitive.presentation_context_definition_list, acc.contexts, roles)
            if not any(cx.result == 0x00 for cx in results):
                rejection, why = NO_PRESENTATION_CONTEXT, "no acceptable presentation context proposed"
        if rejection is None:
            limit = acc._enter(peer.address)
            if limit:
                rejection, why = LOCAL_LIMIT_EXCEEDED, limit
        if rejection is not None:
            if why:
                acc.dropped(peer.address, f"association rejected: {why}", burst=rejection is LOCAL_LIMIT_EXCEEDED)
            self._set_timeout(2)
            self.sock.sendall(_reject(rejection))
            return False
        try:
            self.contexts = {cx.context_id: cx for cx in results if cx.result == 0x00}
            self._syntaxes = {i: (str(cx.transfer_syntax[0]), str(cx.abstract_syntax))
                              for i, cx in self.contexts.items()}
            ac = A_ASSOCIATE()
            ac.application_context_name = APPLICATION_CONTEXT
            ac.calling_ae_title = primitive.calling_ae_title
            ac.called_ae_title = primitive.called_ae_title
            ac.result = 0x00
            ac.result_source = 0x01
            ac.presentation_context_definition_results_list = results
            max_len = MaximumLengthNotification()
            max_len.maximum_length_received = acc.max_pdu
            impl = ImplementationClassUIDNotification()
            impl.implementation_class_uid = IMPLEMENTATION_UID
            name = ImplementationVersionNameNotification()
            name.implementation_version_name = IMPLEMENTATION_VERSION
            ac.user_information = [max_len, impl, name, *ac_roles]
            pdu = A_ASSOCIATE_AC()
            pdu.from_primitive(ac)
            encoded = pdu.encode()
            self._set_timeout(acc.network_timeout)
            self.sock.sendall(encoded)
        except Exception:
            acc._leave(peer.address)
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
                if len(self._command) > 65536:
                    raise ProtocolError("DIMSE command set longer than 64 KiB", 0x06)
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
        transfer_syntax, abstract_syntax = self._syntaxes[context_id]
        if data is not None and _us(cmd, 0x00000100) == C_STORE_RQ:
            self.stored = True
        response = dispatch(self.acceptor.handlers, self.peer, cmd, transfer_syntax, data, abstract_syntax)
        if self._timeout < 1.0:  # the read deadline left little: give the answer a full network_timeout
            self._set_timeout(self.acceptor.network_timeout)
        self.sock.sendall(_p_data(context_id, response))


# --------------------------------------------------------------------------------------------- server
class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler, acceptor: "Acceptor", tls: ssl.SSLContext | None):
        self.acceptor = acceptor
        self.tls = tls
        # The kernel's queue of connections not yet accepted: room for every slot at once (a PACS opening
        # max_associations together), not socketserver's 5.
        self.request_queue_size = max(acceptor.max_connections, 16)
        super().__init__(address, handler)

    def verify_request(self, request, client_address) -> bool:
        """In the accepting thread, before any byte is read and before a thread exists for it."""
        return self.acceptor._admit(client_address[0])

    def process_request(self, request, client_address) -> None:
        """One thread per admitted connection; the ARTIM clock starts now, at accept."""
        accepted = time.monotonic()
        thread = threading.Thread(target=self._serve, args=(request, client_address, accepted),
                                  name="dicom-association", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: close it, and give the slot back
            self.acceptor._disconnected(client_address[0])
            self.shutdown_request(request)
            raise

    def _serve(self, request: socket.socket, client_address, accepted: float) -> None:
        try:
            self.acceptor._serve_connection(request, client_address, accepted, self.tls)
        finally:
            self.shutdown_request(request)
            self.acceptor._disconnected(client_address[0])


def address_allowed(address: str, networks: list) -> bool:
    """Whether ``address`` lies in one of ``networks`` (scp.allowed_peers); an unparsable address never does."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class Acceptor:
    """Listens on one or more ports (plain, TLS) and serves each association in its own thread."""

    def __init__(self, contexts: list[PresentationContext], handlers: Handlers, max_associations: int = 16,
                 network_timeout: float = 60, max_pdu: int = MAX_PDU, association_request_timeout: float = 10,
                 max_associations_per_peer: int = 0, allowed_peers: list[str] | None = None,
                 max_connections: int = 0):
        self.contexts = contexts
        self.handlers = handlers
        self.max_associations = max_associations
        self.max_associations_per_peer = max_associations_per_peer or max_associations
        #: Open connections at most (associations plus callers still inside their A-ASSOCIATE-RQ deadline):
        #: further ones are closed at accept, so a flood costs neither threads nor memory.
        self.max_connections = max_connections or max(4 * max_associations, 32)
        self.network_timeout = network_timeout
        self.association_request_timeout = association_request_timeout
        self.max_pdu = max_pdu
        self._networks = [ipaddress.ip_network(n, strict=False) for n in (allowed_peers or [])]
        self._active = 0
        self._per_peer: Counter[str] = Counter()
        self._connections = 0
        self._lock = threading.Lock()
        self._open: set[_Association] = set()
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self._quiet_until: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()

    # bookkeeping -----------------------------------------------------------------------------
    def _admit(self, address: str) -> bool:
        if self._networks and not self._peer_allowed(address):
            self.dropped(address, "closed at connect: address not in scp.allowed_peers", burst=True)
            return False
        with self._lock:
            if self._connections >= self.max_connections:
                full = True
            else:
                full = False
                self._connections += 1
        if full:
            self.dropped(address, f"closed at connect: {self.max_connections} connections already open "
                                  "(4 x scp.max_associations)", burst=True)
            return False
        return True

    def _disconnected(self, address: str) -> None:
        with self._lock:
            self._connections -= 1

    def _peer_allowed(self, address: str) -> bool:
        return address_allowed(address, self._networks)

    def _enter(self, address: str) -> str:
        """Take an association slot; returns why not (empty string: taken)."""
        with self._lock:
            if self._active >= self.max_associations:
                return f"{self.max_associations} associations already open (scp.max_associations)"
            if self._per_peer[address] >= self.max_associations_per_peer:
                return (f"{self.max_associations_per_peer} associations from this address already open "
                        "(scp.max_associations_per_peer)")
            self._active += 1
            self._per_peer[address] += 1
            return ""

    def _leave(self, address: str) -> None:
        with self._lock:
            self._active -= 1
            self._per_peer[address] -= 1
            if self._per_peer[address] <= 0:
                del self._per_peer[address]

    def dropped(self, address: str, reason: str, burst: bool = False) -> None:
        """Log one dropped or refused connection (peer address and reason, never PHI). ``burst`` reasons
        (refusals at connect, which a flood repeats hundreds of times a second) are logged at most once per
        10 s per address and reason, with the count of those not logged."""
        if burst:
            key = (address, reason)
            now = time.monotonic()
            with self._lock:
                if now < self._quiet_until.get(key, 0.0):
                    self._suppressed[key] += 1
                    return
                self._quiet_until[key] = now + 10.0
                more = self._suppressed.pop(key, 0)
            if more:
                reason += f" (and {more} more like it in the last 10 s)"
        log.warning("connection from %s %s", address, reason)

    @property
    def open_connections(self) -> int:
        return self._connections

    # listening -------------------------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, client_address, accepted: float,
                          tls: ssl.SSLContext | None) -> None:
        assoc = _Association(self, sock, client_address, accepted, tls)
        with self._lock:
            self._open.add(assoc)
        try:
            assoc.serve()
        except Exception:  # one connection must never take the listener down
            log.exception("association from %s failed", client_address[0])
        finally:
            with self._lock:
                self._open.discard(assoc)
            if assoc.sock is not sock:  # the TLS wrapper: close it (the raw socket goes with it)
                try:
                    assoc.sock.close()
                except OSError:
                    pass

    def start(self, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        """Listen on ``address``; with ``tls``, every connection starts with a TLS handshake. Call once per port."""
        server = _Server(address, socketserver.BaseRequestHandler, self, tls)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                  name="dicom-acceptor-tls" if tls else "dicom-acceptor", daemon=True)
        thread.start()
        self._servers.append((server, thread))

    @property
    def server_address(self) -> tuple[str, int]:
        """The first listener's address."""
        assert self._servers
        return self._servers[0][0].server_address[:2]

    def addresses(self) -> list[tuple[str, int, bool]]:
        """(host, port, tls) of every listener."""
        return [(*s.server_address[:2], s.tls is not None) for s, _ in self._servers]

    @property
    def running(self) -> bool:
        return bool(self._servers)

    def stop(self) -> None:
        """Stop listening and cut open associations (peers see the connection close and resend later)."""
        if not self._servers:
            return
        for server, _ in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:
            for a in list(self._open):
                try:
                    a.sock.shutdown(socket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass
        self._servers = []
