"""The one interface every way of sending results implements (dispatch.py picks one per destination).
The outbox (outbox.py) queues, claims and retries; a transport only moves files and says, per outbox row,
what happened.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from storage.deliveries import Claimed

from ..config import Destination


class DestinationError(Exception):
    """The destination could not be reached, refused the association or dropped it: every row not yet
    answered waits for it."""


@dataclass
class Outcome:
    """What happened to one row's files at the destination."""

    ok: bool
    #: on success, what went out ("2 instances by C-STORE"); otherwise what went wrong, in words
    detail: str
    #: with Storage Commitment: the transaction asked under and the deadline for the archive's answer
    commitment: tuple[str, dt.datetime] | None = None


class Transport(Protocol):
    def send(self, items: list[Claimed], destination: Destination,
             connected: Callable[[], None]) -> Iterator[tuple[Claimed, Outcome]]:
        """Send each row's files, yielding each row's outcome as soon as it is known; ``connected()`` once the
        destination answered. Raises :class:`DestinationError` when the destination fails as a whole (the
        rows not yet yielded then wait for it)."""
        ...


def probe(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection, to name why a destination is unreachable (pynetdicom's associate
    reports every such case as an abort)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        raise DestinationError(f"connection refused by {host}:{port}") from None
    except TimeoutError:
        raise DestinationError(f"timeout: no TCP connection to {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise DestinationError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
