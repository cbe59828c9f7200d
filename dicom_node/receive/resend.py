"""Recognising a re-used SOP Instance UID while the C-STORE is answered, without asking the database.

Why here and in memory: the answer (success, or a warning under ``scp.duplicate_policy = "keep"``) must be
known before the row is written (storage/recording.py commits rows in batches, after the answer), and a
database round trip per image would cost the ingest path more than all of the node's own work. Two cheap
checks cover the cases that happen:

- the same series: the instance's file name is fixed by its UIDs, so a file already at that path is a
  re-send; one ``stat`` per C-STORE tells;
- another series (another folder): the UIDs of the last ``StoredIndex.CAPACITY`` instances this run stored map
  to their series folder (a dictionary look-up).

An instance outside both (stored before a restart, into another series, and evicted or never loaded) is
found by the Recorder a few milliseconds after the success status was sent; the policy is then applied
there (an orphan file removed, or the newer copy recorded), and the timeline says the conflict was found late.

Whether a re-send is identical is decided on the encoded data set (the file meta group names the sender, so
it is left out): the same bytes are the same instance. The same image sent in another transfer syntax has
other bytes and counts as other content; the node cannot tell without decoding, which costs the hot path.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .recovery import dataset_offset


class StoredIndex:
    """SOP Instance UID -> series folder of the instances most recently stored, oldest evicted first."""

    #: ~200 bytes an entry: 100 000 instances (hundreds of series) in ~20 MB
    CAPACITY = 100_000

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._folders: OrderedDict[str, str] = OrderedDict()
        self._interned: dict[str, str] = {}  # one string per series folder, shared by its instances
        self._lock = threading.Lock()

    def folder(self, sop_uid: str) -> str | None:
        return self._folders.get(sop_uid)

    def add(self, sop_uid: str, path: str) -> None:
        folder = path.rpartition(os.sep)[0]
        with self._lock:
            if len(self._interned) > 10_000:
                self._interned.clear()
            folder = self._interned.setdefault(folder, folder)
            self._folders[sop_uid] = folder
            if len(self._folders) > self.capacity:
                self._folders.popitem(last=False)


def stored_copy(folder: str, sop_uid: str) -> str:
    """The path of the stored copy of an instance in a series folder (the file store's naming)."""
    return f"{folder}{os.sep}{sop_uid}.dcm"


def same_data_set(path: str, dataset: bytes | memoryview) -> bool | None:
    """Whether the file at ``path`` holds exactly this encoded data set; None if the file is gone (purged)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        start = dataset_offset(raw)
    except ValueError:  # not a Part 10 file we wrote: other content
        return False
    return memoryview(raw)[start:] == memoryview(dataset).cast("B")
