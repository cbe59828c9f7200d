"""Files on disk: received instances, results, and quarantined input, and how the database names them.

Received bytes are written to a temporary file and renamed into place, so a crash never leaves a
half-written instance under its final name; fsync (configurable) makes the success status we send to the
peer mean "on disk". While the listener runs, the temporary files are made ahead of time (SpareFiles).

The database stores a file's path relative to the data folder (``incoming/<study>/<series>/<sop>.dcm``), so a
folder restored from a backup, moved to a new disk or mounted elsewhere by a worker still finds its files:
:func:`stored_path` makes that form and :func:`resolve_stored` reads it against the current folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import uuid
from collections import deque
from pathlib import Path

log = logging.getLogger("storage.filestore")

#: A path component built from a received value: UID characters only (digits and dots, starting with a
#: digit, at most 64), so it can be neither ``.``/``..`` nor contain a separator. The listener validates UIDs
#: fully before this (dicom_node/receive/uids.py); this is the store's own guard. Names are never "made
#: safe" by substitution: two different values must never map to one file.
_COMPONENT = re.compile(r"[0-9][0-9.]{0,63}")


class UnsafePath(ValueError):
    """A value that would not make a safe, unique path component (or a path outside the store)."""


def stored_path(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """How the database names ``path``: relative to the data folder ``root``, with ``/`` separators, when it
    lies inside it; otherwise the absolute path (a file the node did not put in its folder)."""
    full = os.path.abspath(path)
    base = os.path.abspath(root)
    if full.startswith(base + os.sep):
        return full[len(base) + 1:].replace(os.sep, "/")
    return full


def resolve_stored(root: str | os.PathLike, stored: str) -> Path:
    """The file a stored path names under the data folder ``root`` as it is now. FileNotFoundError for an
    empty one (purged); UnsafePath, with the reason in words, for a relative one that would lead outside the
    folder, which callers treat as a missing file.

    Absolute paths are rows written before paths were stored relative, whose folder is not the configured
    one (the migration turned those under it into relative ones): they are read where they point. The check is
    lexical, like :meth:`FileStore._contained`: an admin may link a sub-folder to another disk."""
    if not stored:
        raise FileNotFoundError("no file recorded (purged, or never written)")
    if os.path.isabs(stored):
        return Path(stored)
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, stored))
    if not full.startswith(base + os.sep):
        raise UnsafePath("its recorded path leads outside the data folder (the database and the folder do not "
                         "belong together?)")
    return Path(full)


def _component(kind: str, value: str) -> str:
    if _COMPONENT.fullmatch(value) is None:
        raise UnsafePath(f"{kind} is not usable as a file name (not a DICOM UID)")
    return value


class FileStore:
    def __init__(self, root: Path, fsync: bool = True):
        self.root = Path(os.path.abspath(root))
        self.fsync = fsync
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.quarantine = self.root / "quarantine"
        self._incoming_str = os.path.normpath(str(self.incoming))
        for d in (self.incoming, self.results, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._dirs_made: set[Path] = set()
        self.spares: SpareFiles | None = None

    def start_spares(self, size: int = 64) -> None:
        """Keep a pool of empty files ready for write_atomic (the listener calls this; the CLI does not)."""
        if self.spares is None:
            self.spares = SpareFiles(self.root / ".spare", size)

    def stop_spares(self) -> None:
        if self.spares is not None:
            self.spares.close()
            self.spares = None

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """incoming/<study>/<series>/<sop>.dcm; UnsafePath unless all three are UID-shaped.

        Built as a string (pathlib's operators cost ~20 µs per call on the benchmark machine, on the C-STORE
        hot path)."""
        return self._contained(self._incoming_str, f"{_component('Study Instance UID', study_uid)}{os.sep}"
                               f"{_component('Series Instance UID', series_uid)}{os.sep}"
                               f"{_component('SOP Instance UID', sop_uid)}.dcm")

    def result_path(self, study_uid: str, name: str) -> Path:
        """results/<study>/<name>; ``name`` is ours (e.g. job12), the study UID came from a peer."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise UnsafePath(f"result folder name {name!r} is not a plain name")
        return self._contained(os.path.normpath(str(self.results)),
                               f"{_component('Study Instance UID', study_uid)}{os.sep}{name}")

    @staticmethod
    def _contained(folder: str, relative: str) -> Path:
        """``folder``/``relative`` if it stays inside ``folder`` (second guard against traversal), else UnsafePath.

        The components were already checked; this catches a future caller's mistake: any ``.``/``..`` or empty
        component changes the normalised form, and an absolute ``relative`` does not start with ``folder``.
        Lexical only (no file-system walk, which would cost a stat per component)."""
        full = folder + os.sep + relative
        if os.path.normpath(full) != full or not relative or relative.startswith(os.sep):
            raise UnsafePath("path outside its folder")
        return Path(full)

    def relative(self, path: str | os.PathLike) -> str:
        """The form the database stores for a file under this store (see :func:`stored_path`)."""
        return stored_path(self.root, path)

    def resolve(self, stored: str) -> Path:
        """The file a stored path names in this store (see :func:`resolve_stored`; UnsafePath if none)."""
        return resolve_stored(self.root, stored)

    def write_atomic(self, path: Path, data: bytes | memoryview) -> None:
        d = path.parent
        if d not in self._dirs_made:
            d.mkdir(parents=True, exist_ok=True)
            self._dirs_made.add(d)
        spare = self.spares.take() if self.spares is not None else None
        if spare is not None:
            tmp = spare
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        else:
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

    def quarantine_file(self, path: Path, reason: str) -> Path | None:
        """Move a stored file to quarantine with the reason beside it (None if it is already gone)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        kept = self.quarantine_bytes(data, reason)
        Path(path).unlink(missing_ok=True)
        return kept

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6


class SpareFiles:
    """Empty files made ahead of time, so that storing an instance only writes one and renames it into place.

    Why: creating a file costs ~0.4 ms on the benchmark machine's ext4, a fifth of the node's whole work per
    C-STORE, while writing an existing empty file and renaming it costs ~0.1 ms (bench/run.py, BENCHMARKS.md).
    A background thread keeps the pool full while the peer is busy sending; when the pool runs dry the
    caller simply creates its temporary file itself. The folder sits beside incoming/ on the same file
    system (rename must not cross one) and is emptied at start and stop.
    """

    def __init__(self, folder: Path, size: int = 64):
        self.folder = Path(folder)
        self.size = size
        shutil.rmtree(self.folder, ignore_errors=True)  # leftovers of an earlier run are empty files
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pool: deque[Path] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._fill, name="spare-files", daemon=True)
        self._thread.start()

    def take(self) -> Path | None:
        try:
            path = self._pool.popleft()  # deque operations are atomic: no lock on the hot path
        except IndexError:
            path = None
        if len(self._pool) < self.size // 2:
            self._wake.set()
        return path

    def _fill(self) -> None:
        while not self._stop:
            try:
                while len(self._pool) < self.size and not self._stop:
                    path = self.folder / uuid.uuid4().hex
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                    self._pool.append(path)
            except OSError as exc:  # disk full or folder gone: the callers fall back to creating files
                log.warning("cannot make spare files in %s: %s", self.folder, exc)
                self._wake.wait(5)
            self._wake.wait()
            self._wake.clear()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(5)
        shutil.rmtree(self.folder, ignore_errors=True)
