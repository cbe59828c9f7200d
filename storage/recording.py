"""Recording received instances in the database in batches, off the C-STORE path (group commit).

Why: one transaction per instance was half of the node's own work per C-STORE (~0.2 ms of ~0.4 ms on
SQLite through SQLAlchemy; on PostgreSQL every commit also waits for a WAL flush), and it sat between the
file landing on disk and the success status. The file on disk is the durable record: the listener answers
success once the file is written (and fsynced when ``scp.fsync``), hands the header fields here, and the row
follows within milliseconds, in one transaction with whatever else arrived meanwhile.

What keeps that honest:
- before the node confirms an association's release it waits, a few seconds at most, until that association's
  rows are committed (``wait``), so a sender that has finished knows its instances are in the database, and a
  database that hangs or refuses does not turn a stored series into a failed release;
- a batch the database refuses (down, unreachable, locked) stays queued and is retried with back-off;
  while it fails, or while more than ``MAX_BACKLOG`` rows wait, the listener refuses new instances with
  Out of Resources, so the backlog stays bounded;
- a row the database rejects for its content (a constraint, a value it cannot store) is found by
  recording the batch's rows one by one and left out, logged, its file moved to quarantine with the
  reason (the listener's ``on_rejected``): only that one instance is affected, never the rows around it;
- a file whose row never got written (the node was killed in between) is recorded at the next start
  (``dicom_node.receive.recovery``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .instances import Received, Recorder
from .models import utcnow

log = logging.getLogger("storage.recording")


class BackgroundRecorder:
    """A single writer thread that drains submitted instances into the database in batches."""

    #: How long the writer lets instances gather after the first one of a batch. Small against the seconds
    #: a series needs to settle, large enough to commit several instances of a busy sender together.
    LINGER_S = 0.005
    BATCH_MAX = 500
    #: Rows allowed to wait before the listener answers Out of Resources (a database that hangs rather
    #: than fails would otherwise let them pile up in memory).
    MAX_BACKLOG = 20000
    #: While the database refuses rows, the writer retries at growing intervals up to this many seconds ...
    MAX_BACKOFF_S = 10.0
    #: ... and an instance arriving meanwhile asks for a retry now (at most once per this many seconds) and waits
    #: for it, so that the first C-STORE after the database is back is taken, not refused for one more backoff
    #: (it was refused for up to 30 s after PostgreSQL returned).
    RETRY_ON_ARRIVAL_S = 1.0

    def __init__(self, recorder: Recorder, on_recorded: Callable[[int, int], None] | None = None,
                 on_rejected: Callable[[Received, str], None] | None = None):
        self.recorder = recorder
        self.on_recorded = on_recorded  # (new, duplicates) after each committed batch
        self.on_rejected = on_rejected  # (item, reason) for a row the database refused for its content
        #: each batch committed after the database refused rows, until the backlog is drained: the listener keeps
        #: those series from being judged before their senders resend what was refused meanwhile
        self.on_recovered: Callable[[list[Received]], None] | None = None
        #: seconds those series are held from being judged quiet, set in the transaction that records them
        #: (on_recovered then tells why on their timelines); None: no hold
        self.outage_hold_s: float | None = None
        self._after_outage = False
        self._items: deque[Received] = deque()
        self._cond = threading.Condition()
        self._submitted = 0  # sequence number of the last submitted instance
        self._committed = 0  # ... and of the last one committed
        self._urgent = False
        self._stop = False
        self.failing: str | None = None  # the last error while the database refuses our batches
        self._attempts = 0  # batches tried so far (committed or refused)
        self._last_try = 0.0  # monotonic time of the last try
        self._retry_now = False
        self._trying = False  # a batch is with the database now (it may hang: arrivals do not wait on it)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
            self._thread.start()

    def submit(self, item: Received) -> int:
        """Queue one stored instance; returns its sequence number (for ``wait``)."""
        with self._cond:
            wake = not self._items  # the writer waits for a first item; later ones join its lingering batch
            self._items.append(item)
            self._submitted += 1
            if wake:
                self._cond.notify_all()
            return self._submitted

    @property
    def backlog(self) -> int:
        return len(self._items)

    def refusal(self) -> str | None:
        """Why new instances should be refused now (None: accept them)."""
        if self.failing is not None:
            self._retry_for_arrival()
        if self.failing is not None:
            return f"the database does not accept received instances ({self.failing})"
        if self._thread is None or not self._thread.is_alive():
            return "the recorder thread is not running"
        if len(self._items) > self.MAX_BACKLOG:
            return f"{len(self._items)} received instances wait for the database"
        return None

    def _retry_for_arrival(self) -> None:
        with self._cond:
            if self._trying or time.monotonic() - self._last_try < self.RETRY_ON_ARRIVAL_S:
                return
            tried = self._attempts
            self._retry_now = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._attempts > tried or self._stop, 2 * self.RETRY_ON_ARRIVAL_S)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is committed; False if that took longer than ``timeout``."""
        with self._cond:
            target = self._submitted
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._committed >= target, timeout)

    def wait(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until the instance numbered ``seq`` (and all before it) is committed; False after ``timeout``.

        Unlike ``flush`` this waits only for one association's rows, and hurries the batch along."""
        with self._cond:
            if self._committed >= seq:
                return True
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._committed >= seq, timeout)

    def stop(self, timeout: float = 3) -> None:
        """Commit what is queued (as far as the database lets us within ``timeout``) and end the thread. Bounded
        whatever the database does: a batch stuck in a commit is left to its daemon thread, and the files of
        rows not committed are recorded at the next start."""
        if self._thread is None:
            return
        if not self.flush(timeout) and self._items:
            log.error("%d received instances not yet in the database at stop; their files are on disk and are "
                      "recorded at the next start", len(self._items))
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(1)
        if not self._thread.is_alive():  # else keep it: a later start() must not run a second writer
            self._thread = None

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stop)
                if self._stop:
                    return
                if not self._urgent and len(self._items) < self.BATCH_MAX:
                    self._cond.wait_for(lambda: self._urgent or self._stop, self.LINGER_S)
                self._urgent = False
                batch = [self._items[i] for i in range(min(len(self._items), self.BATCH_MAX))]
                self._last_try, self._retry_now, self._trying = time.monotonic(), False, True
            hold = None
            if self._after_outage and self.outage_hold_s is not None:
                hold = utcnow() + dt.timedelta(seconds=self.outage_hold_s)
            try:
                fresh = commit_rows(self.recorder, batch, self.on_rejected, hold)
            except Exception as exc:  # the database refuses: keep the batch and try again; lose no row
                if self.failing is None:
                    log.error("cannot record %d received instances in the database (retrying): %s",
                              len(batch), str(exc)[:300])
                with self._cond:
                    self.failing, self._trying, self._after_outage = str(exc)[:300], False, True
                    self._attempts += 1
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._stop or self._retry_now, backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)
                continue
            if self.failing is not None:
                log.warning("database accepts received instances again")
            if self._after_outage and self.on_recovered is not None:  # at once: the completion scan sees the rows
                try:
                    self.on_recovered(batch)
                except Exception as exc:  # the series are judged on stable_seconds alone then
                    log.error("after the database came back: %s: %s", type(exc).__name__,
                              (str(exc).splitlines() or [""])[0][:300])
            backoff = 0.5
            with self._cond:
                self.failing, self._trying = None, False
                self._attempts += 1
                for _ in batch:
                    self._items.popleft()
                self._committed += len(batch)
                self._cond.notify_all()
                self._after_outage = self._after_outage and bool(self._items)
            if self.on_recorded is not None:
                try:
                    self.on_recorded(sum(1 for f in fresh if f is True), sum(1 for f in fresh if f is False))
                except Exception:  # a counter must never stop the recording
                    log.exception("on_recorded callback failed")


def commit_rows(recorder: Recorder, batch: list[Received],
                on_rejected: Callable[[Received, str], None] | None = None,
                hold_until: dt.datetime | None = None) -> list[bool | None]:
    """Record a batch; for each item whether it was new, or None if the database rejected that row.

    Errors of the connection or the server (OperationalError and the like) propagate: the whole batch
    waits. Any other error is about some row's content: the rows are then recorded one by one, and
    those the database still rejects are logged and left out.
    """
    first: Exception
    try:
        return list(recorder.record_batch(batch, hold_until))
    except (OperationalError, DisconnectionError, PoolTimeout):
        raise
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        first = exc
    except Exception as exc:
        first = exc
    if len(batch) == 1:
        reason = f"database rejected its row: {type(first).__name__}: {str(first)[:300]}"
        log.error("received instance %s not recorded: %s", batch[0].path, reason)
        if on_rejected is not None:
            on_rejected(batch[0], reason)
        return [None]
    out: list[bool | None] = []
    for item in batch:
        out += commit_rows(recorder, [item], on_rejected, hold_until)
    return out
