"""One association, served in its own thread from A-ASSOCIATE-RQ to release or abort: PDU framing and
deadlines (PS3.8 §9, §E), negotiation through pynetdicom's encoders, P-DATA reassembly; the DIMSE command sets
are read and answered in :mod:`.dimse`, connection and association slots are counted in :mod:`.connections`.
Why a thread per association that blocks in ``recv``, and the deadlines applied: see :mod:`.acceptor`.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING

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

from .connections import log
from .dimse import (
    C_STORE_RQ,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    NO_DATASET,
    Peer,
    ProtocolError,
    Rejection,
    _us,
    dispatch,
    parse_command,
)

if TYPE_CHECKING:
    from .acceptor import Acceptor

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


class Association:
    """One accepted connection, served in its own thread from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, acceptor: Acceptor, sock: socket.socket, address: tuple[str, int], accepted_at: float,
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
        self._data_len = 0  # bytes of the current data set so far, kept or not
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
            except (TimeoutError, ssl.SSLWantReadError):
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
            pdu_type, body = self._read_pdu(
                artim, f"no complete A-ASSOCIATE-RQ within {acc.association_request_timeout:g} s "
                "of connect (scp.association_request_timeout)", MAX_ASSOCIATE_RQ, grow=True)
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
            if not self._associate(body):
                return
            how = "dropped"
            try:
                how = self._serve_established()
            finally:
                acc.ledger.leave(where)
                if self.peer is not None:
                    if how != "released":  # A-ABORT or a dropped connection: a resend is likely
                        acc.handlers.on_aborted(self.peer, how)
                    acc.handlers.on_closed(self.peer)
        except ProtocolError as exc:
            acc.dropped(where, f"aborted: {exc}", burst=self.peer is None)
            self._send_quietly(_abort(exc.reason))
        except Dropped as exc:  # before association a flood repeats it: logged once per interval and address
            acc.dropped(where, f"dropped: {exc}", burst=self.peer is None)
            self._send_quietly(_abort(0x00))
        except ssl.SSLError as exc:
            acc.dropped(where, f"TLS refused: {exc.reason or exc}", burst=True)
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s closed: %s", where, exc)

    def _handshake(self, deadline: float) -> None:
        """The TLS handshake, on a non-blocking socket so that the ARTIM deadline bounds it as a whole."""
        assert self.tls is not None
        raw = self.sock
        raw.setblocking(False)
        tls_sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self.sock = tls_sock
        wait: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket], list[ssl.SSLSocket]]
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
        peer = self.peer
        assert peer is not None, "an association is established only after its request named the peer"
        while True:
            pdu_type, body = self._read_pdu(time.monotonic() + timeout, what, limit)
            if pdu_type == 0x04:
                self._on_p_data(body)
            elif pdu_type == 0x05:  # A-RELEASE-RQ: the handlers may finish work before we confirm
                acc.handlers.on_release(peer, self.stored)
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
                     if isinstance(i, SCP_SCU_RoleSelectionNegotiation) and i.sop_class_uid is not None}
            results, ac_roles = negotiate_as_acceptor(primitive.presentation_context_definition_list, acc.contexts,
                                                      roles)
            if not any(cx.result == 0x00 for cx in results):
                rejection, why = NO_PRESENTATION_CONTEXT, "no acceptable presentation context proposed"
        if rejection is None:
            limit = acc.ledger.enter(peer.address)
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
            acc.ledger.leave(peer.address)
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
                self._data_len += len(fragment)
                if self._data_len <= self.acceptor.max_instance:
                    self._data.append(fragment)
                else:  # read to its end (the association goes on) but not held: memory stays bounded
                    self._data = []
                if control & 0x02:
                    oversize = self._data_len if self._data_len > self.acceptor.max_instance else 0
                    if oversize:
                        data = b""
                    else:
                        data = self._data[0].tobytes() if len(self._data) == 1 else b"".join(self._data)
                    self._data, self._data_len = [], 0
                    self._dispatch(data, oversize)

    def _dispatch(self, data: bytes | None, oversize: int = 0) -> None:
        cmd, self._cmd = self._cmd, None
        context_id = self._context_id
        assert cmd is not None and self.peer is not None
        transfer_syntax, abstract_syntax = self._syntaxes[context_id]
        if data is not None and _us(cmd, 0x00000100) == C_STORE_RQ:
            self.stored = True
        response = dispatch(self.acceptor.handlers, self.peer, cmd, transfer_syntax, data, abstract_syntax, oversize)
        if self._timeout < 1.0:  # the read deadline left little: give the answer a full network_timeout
            self._set_timeout(self.acceptor.network_timeout)
        self.sock.sendall(_p_data(context_id, response))
