"""Start-up recovery: files in incoming/ that have no database row get one.

The listener answers success once a file is on disk and records its row a few milliseconds later in a
batch (storage/recording.py). If the node is killed in between, the file is there and its row is not: at
the next start this finds such files by their names (each is ``<SOP Instance UID>.dcm``), reads their
headers and records them, so the series they belong to is judged and processed like any other. Temporary
files of interrupted writes are removed; a file that cannot be read is moved to quarantine with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from sqlalchemy import select

from storage.filestore import FileStore
from storage.models import Instance
from storage.queue import Received, Recorder

from .headers import UnreadableData, read_received

log = logging.getLogger("dicom_node.recovery")


def _dataset_offset(raw: bytes) -> int:
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
    meta = read_received(raw[_dataset_offset(raw):], ts)
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).replace(tzinfo=None)
    return Received(meta, str(path), len(raw), aet, when)


def record_unrecorded(store: FileStore, recorder: Recorder, batch_size: int = 500) -> int:
    """Record every file under incoming/ that has no row; returns how many were recorded."""
    t0 = time.monotonic()
    recorded = 0
    for tmp in store.incoming.glob("*/*/.*.tmp"):
        tmp.unlink(missing_ok=True)  # an interrupted write: the sender got no success for it
    for series_dir in sorted(p for p in store.incoming.glob("*/*") if p.is_dir()):
        files = {p.stem: p for p in series_dir.glob("*.dcm")}
        if not files:
            continue
        with recorder.db.session() as s:
            known = set(s.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(list(files)))))
        pending: list[Received] = []
        for stem, path in sorted(files.items()):
            if stem in known:
                continue
            try:
                pending.append(read_stored(path))
            except (UnreadableData, OSError) as exc:
                kept = store.quarantine_bytes(path.read_bytes(), f"unreadable at start-up recovery: {exc}")
                path.unlink(missing_ok=True)
                log.warning("stored file %s unreadable (%s): moved to quarantine as %s", path.name, exc, kept.name)
                continue
            if len(pending) >= batch_size:
                recorded += sum(recorder.record_batch(pending))
                pending = []
        if pending:
            recorded += sum(recorder.record_batch(pending))
    if recorded:
        log.warning("recorded %d stored instances that had no database row (the node stopped before recording "
                    "them) in %.1f s", recorded, time.monotonic() - t0)
    return recorded
