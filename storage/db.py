"""Engine and sessions: SQLite (WAL) by default, PostgreSQL or any SQLAlchemy URL when configured."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


class Database:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # a server that does not answer must fail the connect (and the ingest refuse with 0xA700),
            # not hang the recorder: libpq waits forever by default
            args = {"connect_timeout": 10} if url.startswith("postgresql") and "connect_timeout" not in url else {}
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, connect_args=args)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self, data_dir: str | os.PathLike | None = None) -> None:
        """Bring the schema to the newest version with Alembic (creates it on an empty database).

        ``data_dir``: the node's data folder, which a migration that rewrites stored file paths needs
        (0006 makes absolute paths under it relative)."""
        from alembic import command

        with self.engine.begin() as conn:
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = conn
            if data_dir is not None:
                cfg.attributes["data_dir"] = str(data_dir)
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL: readers (CLI, dashboard) never block the C-STORE writers; NORMAL sync is durable in WAL mode
    # across application crashes, and the received files themselves are fsynced by the file store.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
