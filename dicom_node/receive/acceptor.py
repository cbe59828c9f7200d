"""The association acceptor: the DICOM upper layer (PS3.8) for incoming C-STORE and C-ECHO.

Why not pynetdicom's ``AE.start_server``: its acceptor runs two polling threads per association (the DUL
reactor and the association reactor each sleep 1 ms between looks at their queues), which caps one sender
at about 225 images/s on the benchmark machine against dcmtk storescp's 1100 (bench/run.py, a handler that
does nothing). Here each association is one thread that blocks in ``recv`` and answers as soon as the
handler returns, so the node is limited by its own work, the disk and the network.

Hostile peers (PS3.8's ARTIM timer): the A-ASSOCIATE-RQ must arrive whole within
``association_request_timeout`` of connect (TLS handshake included), every later PDU whole within
``network_timeout`` (a deadline for the whole PDU, so trickling a byte at a time does not keep a slot); the
peer-address allowlist and the connection caps (in total, per address, slots kept for the configured peers:
:mod:`.connections`) are applied when the connection is accepted, before a byte is read or a thread is started;
one address may hold at most ``max_associations_per_peer`` of the ``max_associations`` slots, and each holds
at most one data set of ``max_instance`` bytes in memory (a larger one is read and dropped, not buffered
without end). Every drop is logged with the peer address and the reason (those a flood repeats, once per
interval).

This module listens and accepts; one association is served by :mod:`.association`. Only the socket loop is
ours. The standard-defined, intricate parts come from the libraries: pynetdicom
decodes the A-ASSOCIATE-RQ (with all its sub-items), negotiates presentation contexts and SCP/SCU roles
and encodes the A-ASSOCIATE-AC; pydicom writes the Part 10 file meta. What is left is framing: PDU headers,
PDV fragments (PS3.8 §E); the DIMSE command sets are read and answered in :mod:`.dimse`. pynetdicom
remains the node's C-STORE SCU (deliver/dimse.py).
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterable

from pynetdicom.presentation import PresentationContext

from .association import MAX_PDU, Association
from .connections import (
    ConnectionLedger,
    ConnectionLimits,
    RefusalLog,
    address_allowed,
    log,
)
from .dimse import Handlers


# --------------------------------------------------------------------------------------------- server
class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler, acceptor: Acceptor, tls: ssl.SSLContext | None):
        self.acceptor = acceptor
        self.tls = tls
        # The kernel's queue of connections not yet accepted: room for every slot at once (a PACS opening
        # max_associations together), not socketserver's 5.
        self.request_queue_size = max(acceptor.max_connections, 16)
        super().__init__(address, handler)

    def host_port(self) -> tuple[str, int]:
        """Where it listens: (host, port), the first two of an IPv6 address's four too."""
        host, port = self.server_address[:2]
        assert isinstance(host, str), "a TCP listener's host is text"
        return host, port

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


class Acceptor:
    """Listens on one or more ports (plain, TLS) and serves each association in its own thread."""

    def __init__(self, contexts: list[PresentationContext], handlers: Handlers, max_associations: int = 16,
                 network_timeout: float = 60, max_pdu: int = MAX_PDU, association_request_timeout: float = 10,
                 max_associations_per_peer: int = 0, allowed_peers: list[str] | None = None,
                 max_connections: int = 0, max_connections_per_peer: int = 0, reserved_connections: int = 0,
                 peer_hosts: Iterable[str] = (), max_instance: int = 512 << 20, reserved_associations: int = 0):
        """``peer_hosts``: IP addresses of the configured peers besides ``allowed_peers`` (the destinations),
        which may use the reserved connection slots. ``max_instance``: bytes of one data set held at most; a
        larger one is read to its end without being held, and its handler told only its size."""
        self.contexts = contexts
        self.handlers = handlers
        self.limits = ConnectionLimits.resolve(max_associations, max_associations_per_peer, max_connections,
                                               max_connections_per_peer, reserved_connections, reserved_associations)
        self.network_timeout = network_timeout
        self.association_request_timeout = association_request_timeout
        self.max_pdu = max_pdu
        self.max_instance = max_instance
        self._networks = [ipaddress.ip_network(n, strict=False) for n in (allowed_peers or [])]
        self.ledger = ConnectionLedger(self.limits, self._networks, peer_hosts)
        self._refusals = RefusalLog()
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self._servers: list[tuple[_Server, threading.Thread]] = []

    # bookkeeping -----------------------------------------------------------------------------
    def _admit(self, address: str) -> bool:
        """At accept: the allowlist, then the connection caps (connections.py); refusals logged per interval."""
        if self._networks and not address_allowed(address, self._networks):
            self.dropped(address, "closed at connect: address not in scp.allowed_peers", burst=True)
            return False
        why = self.ledger.admit(address)
        if why:
            self.dropped(address, why, burst=True)
            return False
        return True

    def _disconnected(self, address: str) -> None:
        self.ledger.release(address)

    def dropped(self, address: str, reason: str, burst: bool = False) -> None:
        """Log one dropped or refused connection (peer address and reason, never PHI). ``burst`` reasons
        (refusals at connect and drops before association, which a flood repeats as fast as it reconnects)
        are logged at most once per interval per address and reason, with the count of those not logged."""
        if burst:
            self._refusals.refused(address, reason)
        else:
            log.warning("connection from %s %s", address, reason)

    @property
    def max_connections(self) -> int:
        return self.limits.max_connections

    @property
    def open_connections(self) -> int:
        return self.ledger.connections

    # listening -------------------------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, client_address, accepted: float,
                          tls: ssl.SSLContext | None) -> None:
        assoc = Association(self, sock, client_address, accepted, tls)
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
        return self._servers[0][0].host_port()

    def addresses(self) -> list[tuple[str, int, bool]]:
        """(host, port, tls) of every listener."""
        return [(*s.host_port(), s.tls is not None) for s, _ in self._servers]

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
