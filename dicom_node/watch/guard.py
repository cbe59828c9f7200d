"""The dashboard's connections, bounded: how many, how many from one address, and how long a request may take
to arrive.

Why: uvicorn accepts every connection and waits for its request without a deadline (its keep-alive timer
starts only after a first response, and any byte resets it). 1100 connections that each sent half a request
head took every file descriptor of a node under the usual limit of 1024: the DICOM listener could no longer
accept a C-ECHO or write a received file, and asyncio logged each failed accept with a traceback (4 million
log lines in 90 s). The DICOM listener has its own caps (receive/connections.py); these are the dashboard's:

- ``web.max_connections`` open at once, and ``web.max_connections_per_peer`` from one address: beyond them a
  connection is closed as soon as it is accepted, so it holds its descriptor for microseconds;
- ``web.request_timeout``: a request (head and body) must arrive whole this soon after the connection opened
  or the previous response was sent, or the connection is closed. The answer itself may take as long as the
  page needs.

Refusals at connect are logged once per interval per address and reason (a flood repeats them as fast as it
connects; the total cap's, once for all addresses); a connection closed for its deadline only at debug level,
since browsers open spare connections they may never use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..receive.connections import RefusalLog

log = logging.getLogger("dicom_node.watch.guard")


#: Seconds between two log lines of asyncio's "socket.accept() out of system resource".
ACCEPT_ERROR_EVERY_S = 10.0


class _AcceptErrors(logging.Filter):
    """asyncio logs every failed accept (no descriptors left) with a traceback, and retries each second; one
    line per interval says the same."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + ACCEPT_ERROR_EVERY_S
        exc = record.exc_info[1] if record.exc_info else None
        record.msg, record.args, record.exc_info, record.exc_text = (
            "cannot accept connections: %s (no file descriptors left; told at most every %g s)",
            (exc or "out of system resource", ACCEPT_ERROR_EVERY_S), None, None)
        return True


def quiet_accept_errors() -> None:
    """Install the filter once on asyncio's logger."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AcceptErrors) for f in logger.filters):
        logger.addFilter(_AcceptErrors())


class ConnectionGuard:
    """Counts the dashboard's open connections (all on the server's event loop: no lock needed)."""

    def __init__(self, max_connections: int, per_peer: int, request_timeout: float):
        self.max_connections = max_connections
        self.per_peer = per_peer
        self.request_timeout = request_timeout
        self.open = 0
        self._per_peer: Counter[str] = Counter()
        self.refusals = RefusalLog(logger=log)

    def admit(self, address: str) -> bool:
        """Take a slot, or log why not (the total cap is filled by many addresses at once: one line for all of
        them, not one per address) and return False."""
        if self.open >= self.max_connections:
            self.refusals.refused("any address", f"closed at connect: {self.max_connections} dashboard connections "
                                                 "already open (web.max_connections)")
            return False
        if self._per_peer[address] >= self.per_peer:
            self.refusals.refused(address, f"closed at connect: {self.per_peer} dashboard connections from this "
                                           "address already open (web.max_connections_per_peer)")
            return False
        self.open += 1
        self._per_peer[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        self._per_peer[address] -= 1
        if self._per_peer[address] <= 0:
            del self._per_peer[address]

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's HTTP/1.1 protocol class with this guard applied (``uvicorn.Config(http=...)``)."""
        return type("GuardedH11Protocol", (_Guarded,), {"guard": self})


class _Guarded(H11Protocol):
    """H11Protocol that takes a slot at connect and closes a connection whose request does not arrive in time."""

    guard: ConnectionGuard
    _peer = ""
    _admitted = False
    _deadline: asyncio.TimerHandle | None = None
    _awaiting: Any = None  # the request cycle current when the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = self.client[0] if self.client else ""
        if not self.guard.admit(self._peer):
            transport.abort()  # the descriptor goes back now
            return
        self._admitted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.guard.release(self._peer)
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # armed first, on the cycle just answered: uvicorn may start the next (pipelined) request inside the
        # call, and that one must count as arrived
        if self._admitted:
            self._arm()  # the next request on this connection has the same time to arrive
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._awaiting = self.cycle
        self._deadline = self.loop.call_later(self.guard.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        """Close the connection if its request is still arriving: no new request head yet, or its body
        unfinished while nothing has been answered."""
        self._deadline = None
        cycle = self.cycle
        head_missing = cycle is self._awaiting
        body_missing = cycle is not None and cycle.more_body and not cycle.response_started
        if head_missing or body_missing:
            # debug only: browsers open spare connections they may never use; what a flood does is told by the
            # caps' refusals
            log.debug("dashboard connection from %s closed: no whole request within %g s (web.request_timeout)",
                      self._peer, self.guard.request_timeout)
            self.transport.close()
