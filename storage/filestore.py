"""Files on disk: received instances, results, and quarantined input.

Received bytes are written to a temporary file in the target folder and renamed into place, so a crash
never leaves a half-written instance under its final name; fsync (configurable) makes the success status
we send to the peer mean "on disk".
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name)[:64] or "unknown"


class FileStore:
    def __init__(self, root: Path, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.quarantine = self.root / "quarantine"
        for d in (self.incoming, self.results, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._dirs_made: set[Path] = set()

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.incoming / _safe(study_uid) / _safe(series_uid) / f"{_safe(sop_uid)}.dcm"

    def result_path(self, study_uid: str, name: str) -> Path:
        return self.results / _safe(study_uid) / name

    def write_atomic(self, path: Path, data: bytes | memoryview) -> None:
        d = path.parent
        if d not in self._dirs_made:
            d.mkdir(parents=True, exist_ok=True)
            self._dirs_made.add(d)
        tmp = d / f".{path.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def quarantine_bytes(self, data: bytes, reason: str) -> Path:
        """Keep undecodable input for an admin to inspect instead of dropping it."""
        name = uuid.uuid4().hex
        path = self.quarantine / f"{name}.bin"
        self.write_atomic(path, data)
        (self.quarantine / f"{name}.txt").write_text(reason + "\n")
        return path

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6
