"""Connection accounting per peer address, from the moment of TCP accept.

Why from accept and not from association: a caller that connects and sends only the first bytes of an
A-ASSOCIATE-RQ holds a connection slot (and a thread) until its ARTIM deadline, without ever becoming an
association; reconnecting at each drop, one address kept every slot of the node. So every open connection
counts against its address from accept on, and three limits apply before a byte is read or a thread exists:

- ``scp.max_connections``: connections open at once (associations plus callers inside their ARTIM deadline);
- ``scp.max_connections_per_peer``: the share of those one address may hold;
- ``scp.reserved_connections``: the last slots, open only to the configured peers (the addresses of the
  destinations and of ``scp.allowed_peers``), so the PACS gets in even while many addresses flood the node.

Associations are counted here as well (``scp.max_associations``, ``scp.max_associations_per_peer``), and their
last slots are kept for the configured peers too (``scp.reserved_associations``): an association that stays
open (a C-ECHO within every ``network_timeout``) is no flood, and two addresses of such callers held every
slot while the PACS was rejected. Refusals
repeat as fast as a flood reconnects, so they are logged once per interval per address and reason, with the
number not logged (never more than the peer address: no PHI is known at that point anyway).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("dicom_node.receive.acceptor")

#: Seconds between two log lines about the same address and reason.
LOG_INTERVAL_S = 10.0
#: Keys the refusal log keeps before it forgets those whose interval has passed (a flood from many addresses).
_LOG_KEYS_MAX = 4096


def address_allowed(address: str, networks: list) -> bool:
    """Whether ``address`` lies in one of ``networks`` (scp.allowed_peers); an unparsable address never does."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


@dataclass(frozen=True)
class ConnectionLimits:
    """The connection caps in effect (configured values with 0 replaced by their derived defaults)."""

    max_connections: int
    per_peer: int
    reserved: int
    max_associations: int
    max_associations_per_peer: int
    #: the last association slots, for the configured peers only
    reserved_associations: int = 0

    @classmethod
    def resolve(cls, max_associations: int, max_associations_per_peer: int = 0, max_connections: int = 0,
                max_connections_per_peer: int = 0, reserved_connections: int = 0,
                reserved_associations: int = 0) -> ConnectionLimits:
        """0 means derived: 4 x max_associations connections (at least 32), a quarter of them per address (at
        least max_associations_per_peer), an eighth of them reserved for the configured peers, and an eighth
        of the association slots (at least one) reserved for them too."""
        per_assoc = max_associations_per_peer or max_associations
        total = max_connections or max(4 * max_associations, 32)
        per_peer = max_connections_per_peer or min(total, max(total // 4, per_assoc))
        reserved = reserved_connections or total // 8
        kept = min(reserved_associations or max(1, max_associations // 8), max_associations - 1)
        return cls(total, per_peer, min(reserved, total - 1), max_associations, per_assoc, kept)


def peer_addresses(hosts: Iterable[str]) -> set[str]:
    """The IP addresses of configured hosts (names resolved once, at start; one that does not resolve is
    logged and left out: its connections are then served as any other address's)."""
    out: set[str] = set()
    for host in hosts:
        if not host:
            continue
        try:
            out.update(str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
        except OSError as exc:
            log.warning("destination host %s does not resolve (%s): no connection slots kept for it", host, exc)
    return out


def destination_hosts(destinations: Iterable) -> list[str]:
    """The host of each configured destination or source (a STOW destination's from its URL)."""
    hosts = []
    for dest in destinations:
        host = urlsplit(dest.url).hostname if getattr(dest, "protocol", "dimse") == "stow" else dest.host
        if host:
            hosts.append(host)
    return hosts


class RefusalLog:
    """Logs a refusal at most once per ``interval`` per (address, kind), with the count of those not logged.

    ``kind`` defaults to the reason; give one where the reason names a value that changes from one refusal to
    the next (a UID), or every refusal would be a new kind and a flood would be logged line by line."""

    def __init__(self, interval: float = LOG_INTERVAL_S, logger: logging.Logger | None = None,
                 template: str = "connection from %s %s"):
        self.interval = interval
        self._log = logger or log
        self._template = template
        self._lock = threading.Lock()
        self._quiet_until: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()

    def refused(self, address: str, reason: str, kind: str | None = None) -> None:
        key = (address, reason if kind is None else kind)
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until.get(key, 0.0):
                self._suppressed[key] += 1
                return
            if len(self._quiet_until) >= _LOG_KEYS_MAX:
                for k in [k for k, until in self._quiet_until.items() if until <= now]:
                    del self._quiet_until[k]
                    self._suppressed.pop(k, None)
            self._quiet_until[key] = now + self.interval
            more = self._suppressed.pop(key, 0)
        if more:
            reason += f" (and {more} more like it in the last {self.interval:g} s)"
        self._log.warning(self._template, address, reason)


class ConnectionLedger:
    """Open connections and associations, in total and per peer address; every check under one lock."""

    def __init__(self, limits: ConnectionLimits, peer_networks: list | None = None,
                 peer_hosts: Iterable[str] = ()):
        self.limits = limits
        #: the configured peers: the reserved slots are theirs
        self._networks = list(peer_networks or [])
        self._hosts = set(peer_hosts)
        self._lock = threading.Lock()
        self._connections = 0
        self._conn_per_peer: Counter[str] = Counter()
        self._associations = 0
        self._assoc_per_peer: Counter[str] = Counter()

    def configured_peer(self, address: str) -> bool:
        return address in self._hosts or address_allowed(address, self._networks)

    @property
    def has_configured_peers(self) -> bool:
        return bool(self._hosts or self._networks)

    # connections -----------------------------------------------------------------------------
    def admit(self, address: str) -> str:
        """Take a connection slot at accept; returns why not (empty string: taken)."""
        lim = self.limits
        # a configured peer's check (a network walk) is only needed for the reserved slots
        unreserved = lim.max_connections - (lim.reserved if self.has_configured_peers else 0)
        with self._lock:
            if self._connections >= lim.max_connections:
                return f"closed at connect: {lim.max_connections} connections already open (scp.max_connections)"
            if self._conn_per_peer[address] >= lim.per_peer:
                return (f"closed at connect: {lim.per_peer} connections from this address already open "
                        "(scp.max_connections_per_peer)")
            if self._connections >= unreserved and not self.configured_peer(address):
                return (f"closed at connect: only the {lim.reserved} connection slots kept for configured peers "
                        "are free (scp.reserved_connections)")
            self._connections += 1
            self._conn_per_peer[address] += 1
            return ""

    def release(self, address: str) -> None:
        with self._lock:
            self._connections -= 1
            self._conn_per_peer[address] -= 1
            if self._conn_per_peer[address] <= 0:
                del self._conn_per_peer[address]

    # associations ----------------------------------------------------------------------------
    def enter(self, address: str) -> str:
        """Take an association slot; returns why not (empty string: taken)."""
        lim = self.limits
        unreserved = lim.max_associations - (lim.reserved_associations if self.has_configured_peers else 0)
        with self._lock:
            if self._associations >= lim.max_associations:
                return f"{lim.max_associations} associations already open (scp.max_associations)"
            if self._assoc_per_peer[address] >= lim.max_associations_per_peer:
                return (f"{lim.max_associations_per_peer} associations from this address already open "
                        "(scp.max_associations_per_peer)")
            if self._associations >= unreserved and not self.configured_peer(address):
                return (f"only the {lim.reserved_associations} association slots kept for configured peers are "
                        "free (scp.reserved_associations)")
            self._associations += 1
            self._assoc_per_peer[address] += 1
            return ""

    def leave(self, address: str) -> None:
        with self._lock:
            self._associations -= 1
            self._assoc_per_peer[address] -= 1
            if self._assoc_per_peer[address] <= 0:
                del self._assoc_per_peer[address]

    # reading ---------------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        return self._connections

    @property
    def associations(self) -> int:
        return self._associations

    def connections_from(self, address: str) -> int:
        with self._lock:
            return self._conn_per_peer.get(address, 0)
