"""Failures of the node's periodic loops, told once: the completion scan, the dispatch, the sender and the
corrections intake each run every fraction of a second, so a database down for ten minutes made thousands of
identical ERROR tracebacks (measured: 418 in 33 s). Each loop now says when it starts failing and why, reminds
every few minutes while it keeps failing, and says when it works again — the lines an admin acts on.

Only the first line of the error is logged at ERROR: a database error's later lines quote the statement and its
parameters, which can be patient data. The traceback goes to DEBUG, for whoever fixes it.
"""

from __future__ import annotations

import logging
import time

#: while a loop keeps failing the same way, one reminder per this many seconds
REMIND_S = 300.0
#: a loop works again once it has had no failure for this long: during an outage some rounds touch no table
#: and succeed, which must not end the outage in the log (it flapped 4 times in 6 s)
SETTLE_S = 5.0


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Repeats:
    """The failure log of one periodic task (used from that task's thread only). As a context manager it is the
    task's guard: an Exception in the block is told (and swallowed, so the loop goes on), a clean exit is ``ok``."""

    def __init__(self, logger: logging.Logger, what: str, remind_s: float = REMIND_S, settle_s: float = SETTLE_S):
        self.log, self.what, self.remind_s, self.settle_s = logger, what, remind_s, settle_s
        self.failures = 0
        self._since = self._told = self._last = 0.0
        self._reason = ""

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        reason = first_line(exc)
        self.log.debug("%s failed", self.what, exc_info=exc)
        if self.failures == 0:
            self.log.error("%s failed: %s (told again every %.0f min while it lasts)", self.what, reason,
                           self.remind_s / 60)
            self._since = self._told = now
        elif reason != self._reason or now - self._told >= self.remind_s:
            self.log.error("%s still failing (%d times in %.0f s): %s", self.what, self.failures + 1,
                           now - self._since, reason)
            self._told = now
        self.failures += 1
        self._reason = reason
        self._last = now

    def ok(self) -> None:
        if self.failures and time.monotonic() - self._last >= self.settle_s:
            self.log.warning("%s works again (%d failures in %.0f s)", self.what, self.failures,
                             time.monotonic() - self._since)
            self.failures = 0

    def __enter__(self) -> Repeats:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            self.ok()
            return False
        if isinstance(exc, Exception):  # not SystemExit or KeyboardInterrupt
            self.failed(exc)
            return True
        return False
