"""Telling admins: JSON webhooks for the events someone must act on.

Events: ``destination-down`` (a destination refused everything for longer than
``notifications.destination_down_minutes``), ``destination-up`` (it answers again after such an alert),
``delivery-failed`` (given up after ``give_up_after_hours``: the dead letter), ``job-failed``,
``job-held`` (a result held for review), ``disk-floor`` (C-STOREs refused below ``scp.min_free_disk_mb``) and
``accuracy-drop`` (the serving model's rolling median Dice of a bone fell below ``learning.accuracy_floor`` on
the radiologists' corrections; once per bone and model version until it recovers: learn/accuracy.py).

``notify`` never blocks its caller and never raises: the POSTs go out from one background thread, each with
``notifications.timeout_seconds``; a webhook that is down is logged and the event dropped (the same facts are
on the dashboard, in /metrics and on the timeline). Payloads carry ids, UIDs and reasons, never patient
names or IDs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from typing import Any

from storage.models import utcnow

from .config import Settings

log = logging.getLogger("dicom_node.notify")

EVENTS = ("destination-down", "destination-up", "delivery-failed", "job-failed", "job-held", "disk-floor",
          "accuracy-drop")

_queue: queue.Queue[tuple[list[str], float, bytes]] = queue.Queue(maxsize=1000)
_thread: threading.Thread | None = None
_lock = threading.Lock()


def notify(settings: Settings, event: str, payload: dict[str, Any]) -> None:
    """Queue ``event`` with ``payload`` for every configured webhook; returns at once."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r} (known: {', '.join(EVENTS)})")
    cfg = settings.notifications
    log.info("notification %s: %s", event, {k: v for k, v in payload.items() if k != "detail"})
    if not cfg.webhooks:
        return
    body = json.dumps({"event": event, "node": settings.scp.ae_title,
                       "at": utcnow().isoformat(timespec="seconds") + "Z", **payload}, default=str).encode()
    _start()
    try:
        _queue.put_nowait((list(cfg.webhooks), cfg.timeout_seconds, body))
    except queue.Full:
        log.error("notification %s dropped: %d notifications are waiting for their webhooks", event, _queue.qsize())


def _start() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="notify", daemon=True)
            _thread.start()


def _run() -> None:
    while True:
        urls, timeout, body = _queue.get()
        for url in urls:
            try:
                req = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    r.read(1024)
            except Exception as exc:  # a webhook that is down must not stop the others
                log.warning("webhook %s failed: %s", url.split("?")[0], exc)

