"""Probing a down destination: one C-ECHO (DIMSE) or one QIDO request (STOW) every ``probe_seconds``.

Why: a destination's deliveries wait on its backoff clock, which doubles up to ``retry_max_seconds``
(minutes), so a PACS back after a long outage would wait out the rest of that clock. A probe is cheap (one
association or one HTTP request, short timeouts) and runs apart from the backoff; the first one answered
marks the destination up, which makes every delivery waiting for it due at once (storage/deliveries.py,
``destination_ok``), and wakes the sender loop. Only a destination that is down is probed, never more than
one probe at a time per destination, each in its own daemon thread so that neither the sender's round nor
the node's stop waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from ..config import Destination
from ..errors import network_reason
from ..tls import client_context, server_name
from .transport import DestinationError, probe

log = logging.getLogger("dicom_node.deliver.probe")

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: Every step of one probe (TCP connect, association answer, C-ECHO answer, HTTP answer) is bounded by this.
PROBE_TIMEOUT_S = 4.0


def echo_destination(dest: Destination, calling_ae: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """C-ECHO the destination as deliveries reach it (AE titles, DICOM TLS); returns "" when it answers,
    otherwise why not. The SEG and SR storage classes are proposed too (nothing is sent on them): an archive
    that does not offer Verification still accepts the association, and that proves it up."""
    ae = AE(ae_title=dest.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in (Verification, SEGMENTATION, COMPREHENSIVE_3D_SR):
        ae.add_requested_context(sop_class)
    tls = (client_context(dest), server_name(dest)) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        if assoc.is_rejected:
            return f"association rejected by {dest.host}:{dest.port}"
        try:  # name a refused or unreachable port (pynetdicom reports those as an abort)
            probe(dest.host, dest.port, timeout)
        except DestinationError as exc:
            return str(exc)
        return f"no association with {dest.host}:{dest.port} within {timeout:g} s"
    try:
        if not any(cx.abstract_syntax == Verification for cx in assoc.accepted_contexts):
            return ""
        status = assoc.send_c_echo()
        return "" if status else f"no C-ECHO answer from {dest.host}:{dest.port} within {timeout:g} s"
    finally:
        if assoc.is_established:
            assoc.release()


def query_destination(dest: Destination, timeout: float = PROBE_TIMEOUT_S) -> str:
    """QIDO-RS ``GET {url}/studies?limit=1`` (with the destination's credentials); returns "" for any HTTP
    answer below 500 (even 401 or 404 prove the server up), otherwise why not."""
    import requests
    from dicomweb_client.session_utils import create_session_from_user_pass

    url = dest.url.rstrip("/") + "/studies"
    with (create_session_from_user_pass(dest.username, dest.password) if dest.username else requests.Session()) as s:
        try:
            with s.get(url, params={"limit": 1}, headers={"Accept": "application/dicom+json"},
                       timeout=(timeout, timeout), stream=True) as resp:
                status = resp.status_code
        except requests.RequestException as exc:
            return network_reason(exc, dest.url) or f"no HTTP answer from {dest.url} ({type(exc).__name__})"
    return "" if status < 500 else f"HTTP {status} from {url}"


def check(dest: Destination, calling_ae: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The probe of the destination's ``protocol``: "" when it answers, otherwise why not."""
    if dest.protocol == "stow":
        return query_destination(dest, timeout)
    return echo_destination(dest, calling_ae, timeout)


class Prober:
    """Probes for the sender: ``maybe_probe`` starts one in the background when the destination's interval
    has run out and none is in flight; ``answered(dest)`` is called from the probe's thread when it answers."""

    def __init__(self, answered: Callable[[Destination], None], check: Callable[[Destination], str]):
        self._answered, self._check = answered, check
        self._last: dict[str, float] = {}  # monotonic time of the last look at each destination
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def tried(self, name: str) -> None:
        """A delivery to ``name`` just failed at the connection: as good as a probe; the next is an interval on."""
        with self._lock:
            self._last[name] = time.monotonic()

    def due_in(self, dest: Destination) -> float:
        """Seconds until the destination's next probe is due (0: now)."""
        with self._lock:
            last = self._last.get(dest.name)
        return 0.0 if last is None else max(0.0, last + dest.probe_seconds - time.monotonic())

    def in_flight(self, name: str) -> bool:
        with self._lock:
            t = self._running.get(name)
            return t is not None and t.is_alive()

    def maybe_probe(self, dest: Destination) -> bool:
        """Start a probe of the (down) destination if one is due and none runs; returns whether one started."""
        if self._closed.is_set():
            return False
        with self._lock:
            t = self._running.get(dest.name)
            if t is not None and t.is_alive():
                return False
            last = self._last.get(dest.name)
            if last is not None and time.monotonic() < last + dest.probe_seconds:
                return False
            self._last[dest.name] = time.monotonic()
            t = threading.Thread(target=self._probe, args=(dest,), name=f"probe-{dest.name}", daemon=True)
            self._running[dest.name] = t
        t.start()
        return True

    def close(self) -> None:
        """No probe starts any more, and one in flight reports nothing (the node is stopping)."""
        self._closed.set()

    def _probe(self, dest: Destination) -> None:
        try:
            reason = self._check(dest)
        except Exception as exc:  # a probe must never take the sender down; the destination stays down
            log.debug("probe of %s failed", dest.name, exc_info=True)
            reason = f"probe failed: {type(exc).__name__}"
        if self._closed.is_set():
            return
        if reason:
            log.debug("destination %s still down: %s", dest.name, reason)
            return
        try:
            self._answered(dest)
        except Exception:
            log.exception("destination %s answered a probe, but marking it up failed", dest.name)
