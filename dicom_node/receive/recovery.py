"""Start-up recovery: files in incoming/ that have no database row get one.

The listener answers success once a file is on disk and records its row a few milliseconds later in a
batch (storage/recording.py). If the node is killed in between, the file is there and its row is not: at
the next start this finds such files by their names (each is ``<SOP Instance UID>.dcm``), reads their
headers and records them, so the series they belong to is judged and processed like any other. Temporary
files of interrupted writes are removed; a file that cannot be read is moved to quarantine with the reason.
The listener runs this only after an unclean stop (no ``.clean-stop`` marker in the data folder), so a large
store is not walked at every start.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from sqlalchemy import select

from storage.filestore import FileStore
from storage.instances import Received, Recorder
from storage.models import Instance
from storage.recording import commit_rows

from .headers import UnreadableData, read_received

log = logging.getLogger("dicom_node.receive.recovery")


def dataset_offset(raw: bytes) -> int:
    """Where the data set starts in a Part 10 file: after preamble, "DICM" and the file meta group."""
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00":
        raise UnreadableData("not a Part 10 file with a file meta group length")
    return 144 + int.from_bytes(raw[140:144], "little")


def read_stored(path: Path) -> Received:
    """The row a stored file should have, read back from the file."""
    raw = path.read_bytes()
    try:
        fm = read_file_meta_info(path)
        ts = str(fm.TransferSyntaxUID)
        aet = str(fm.get("SourceApplicationEntityTitle", "") or "").strip()
    except Exception as exc:
        raise UnreadableData(f"unreadable file meta: {exc}") from None
    meta = read_received(raw[dataset_offset(raw):], ts)
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).replace(tzinfo=None)
    return Received(meta, str(path), len(raw), aet, when)


def record_unrecorded(store: FileStore, recorder: Recorder, batch_size: int = 500,
                      on_rejected: Callable[[Received, str], None] | None = None) -> int:
    """Record every file under incoming/ that has no row; returns how many were recorded."""
    t0 = time.monotonic()
    recorded = 0
    for tmp in store.incoming.glob("*/*/.*.tmp"):
        tmp.unlink(missing_ok=True)  # an interrupted write: the sender got no success for it
    for series_dir in sorted(p for p in store.incoming.glob("*/*") if p.is_dir()):
        files = {p.stem: p for p in series_dir.glob("*.dcm")}
        names = sorted(files)
        known: set[str] = set()
        for i in range(0, len(names), batch_size):  # bounded IN lists: a series may hold thousands of files
            with recorder.db.session() as s:
                known.update(s.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(names[i:i + batch_size]))))
        pending: list[Received] = []
        for stem in names:
            if stem in known:
                continue
            path = files[stem]
            try:
                pending.append(read_stored(path))
            except OSError as exc:  # unreadable now (I/O error, permissions): leave it for the next start
                log.error("stored file %s not readable at start-up recovery, left in place: %s", path, exc)
                continue
            except UnreadableData as exc:
                kept = store.quarantine_file(path, f"unreadable at start-up recovery: {exc}")
                log.warning("stored file %s unreadable (%s): moved to quarantine as %s", path.name, exc,
                            kept.name if kept else "-")
                continue
            if len(pending) >= batch_size:
                recorded += sum(1 for f in commit_rows(recorder, pending, on_rejected) if f)
                pending = []
        if pending:
            recorded += sum(1 for f in commit_rows(recorder, pending, on_rejected) if f)
    if recorded:
        log.warning("recorded %d stored instances that had no database row (the node stopped before recording "
                    "them) in %.1f s", recorded, time.monotonic() - t0)
    return recorded
