"""``dicom-node backup DEST``: a copy of a node (database and data folder) that can be restored anywhere.

The copy has the data folder's own layout (``incoming/``, ``results/``, ``quarantine/``, ``models/`` (the
checkpoints learning rounds made: the registry's rows point at them), and for SQLite ``node.db``), so
restoring is copying it to the new ``node.data_dir``: the database stores file paths relative to that folder
(storage/filestore.py). The database is copied first and the files after it, so every row has its file;
files that arrived in between have no row, and the start-up recovery records them.
Safe while the node runs: SQLite's online backup gives a consistent copy while the node writes, PostgreSQL's
``pg_dump`` a consistent snapshot, and files are only ever renamed into place complete.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from ..config import Settings

#: What of the data folder is copied: the rest (``.spare``, temporary files, the clean-stop marker, the
#: SQLite database, copied apart) is not part of a node's state.
FOLDERS = ("incoming", "results", "quarantine", "models")


class BackupError(Exception):
    """The backup could not be made; the message says why in words."""


@dataclass
class BackupReport:
    database: str  # what was written for the database, in words
    files: int
    bytes: int


def backup(settings: Settings, dest: Path) -> BackupReport:
    """Copy the node's database and data folder into ``dest`` (a new or empty folder)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise BackupError(f"{dest} is a file: give a new folder")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: give a new folder")
    if dest.resolve().is_relative_to(settings.data_dir.resolve()):
        raise BackupError(f"{dest} lies inside the data folder {settings.data_dir}: give a folder outside it")
    dest.mkdir(parents=True, exist_ok=True)
    database = _database(settings, dest)
    files = size = 0
    for name in FOLDERS:
        src = settings.data_dir / name
        if not src.is_dir():
            continue
        for folder, dirs, names in os.walk(src):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            target = dest / Path(folder).relative_to(settings.data_dir)
            target.mkdir(parents=True, exist_ok=True)
            for n in names:
                if n.startswith("."):  # a write in progress (.<name>.tmp): not acknowledged, not state
                    continue
                try:
                    shutil.copy2(Path(folder) / n, target / n)
                except FileNotFoundError:  # removed meanwhile (retention purge, quarantine): not needed
                    continue
                files += 1
                size += (target / n).stat().st_size
    return BackupReport(database, files, size)


def _database(settings: Settings, dest: Path) -> str:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise BackupError("the database is in memory: nothing to back up")
        target = dest / "node.db"
        src = sqlite3.connect(url.database)
        try:
            out = sqlite3.connect(target)
            try:
                src.backup(out)  # SQLite's online backup: consistent while the node writes
            finally:
                out.close()
        finally:
            src.close()
        return f"SQLite database copied to {target}"
    if url.get_backend_name() == "postgresql":
        pg_dump = shutil.which("pg_dump")
        if pg_dump is None:
            raise BackupError("pg_dump is not installed (PostgreSQL client tools): install it, or run pg_dump "
                              "yourself and copy the data folder")
        target = dest / "node.pgdump"
        env = dict(os.environ)
        if url.password:
            env["PGPASSWORD"] = str(url.password)
        libpq = url.set(drivername="postgresql", password=None)  # its query (sslmode, options) is libpq's too
        r = subprocess.run([pg_dump, "--format=custom", f"--file={target}",
                            f"--dbname={libpq.render_as_string(hide_password=False)}"],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise BackupError(f"pg_dump failed: {r.stderr.strip()[-500:]}")
        return f"PostgreSQL database dumped to {target} (restore with pg_restore into an empty database)"
    raise BackupError(f"cannot back up a {url.get_backend_name()} database: use its own tools, then copy the "
                      "data folder")
