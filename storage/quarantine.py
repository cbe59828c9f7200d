"""How much refused input the node keeps: quarantine/ up to a size, then the reason in the log only.

Why: every refused C-STORE data set is kept for an admin to inspect. Without a bound, one peer sending bad
data sets on and on fills the disk: at ``scp.min_free_disk_mb`` the listener then refuses the PACS's good
images too, so a hostile or broken sender would stop the whole site's segmentation by being refused. A
refused data set past the bound is still refused with its status (the sender knows, nothing it was told was
stored is lost) and counted; only the copy for inspection is not made.

What is counted is the folder's size as found at the first refusal, plus what the listener adds; when the
bound is reached the folder is measured again (at most once a minute), so files an admin removes make room
without a restart. Copies the node keeps of files it had already acknowledged (a database that refused the
row, a file unreadable at start-up) are not the peer's to limit and are always kept (FileStore.quarantine_file).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .filestore import FileStore

log = logging.getLogger("storage.quarantine")

#: Seconds between two measurements of the folder while it is at its bound, and between two log lines
#: saying that refused data sets are no longer kept.
REMEASURE_EVERY_S = 60.0


def folder_bytes(folder: Path) -> int:
    """The size of the files directly in ``folder`` (the quarantine is flat)."""
    total = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # removed meanwhile
                    continue
    except FileNotFoundError:
        return 0
    return total


class QuarantineBudget:
    """Keeps refused data sets in the store's quarantine/ while it holds less than ``max_bytes``."""

    def __init__(self, store: FileStore, max_bytes: int):
        self.store = store
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None  # measured at the first refusal, not at start (a large folder is slow)
        self._measured = 0.0
        self._told = -REMEASURE_EVERY_S

    def keep(self, data: bytes, reason: str) -> Path | None:
        """Write ``data`` and its reason to quarantine/ if the bound allows: the file's path, or None when it
        was not kept (the reason is then logged, once a minute)."""
        size = len(data) + len(reason.encode()) + 1
        with self._lock:
            now = time.monotonic()
            if self._used is None or (self._used + size > self.max_bytes
                                      and now - self._measured >= REMEASURE_EVERY_S):
                self._used, self._measured = folder_bytes(self.store.quarantine), now
            if self._used + size > self.max_bytes:
                if now - self._told >= REMEASURE_EVERY_S:
                    self._told = now
                    log.error("quarantine/ holds %d MB, at scp.quarantine_max_mb (%d MB): refused data sets are "
                              "still refused and logged but no longer kept; inspect and remove what is there",
                              self._used >> 20, self.max_bytes >> 20)
                return None
            self._used += size
        return self.store.quarantine_bytes(data, reason)
