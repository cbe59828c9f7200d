"""Every way a job can fail ends in words an admin can act on; the exception goes to the debug log only."""

from __future__ import annotations

import errno
import logging
import re
import time

import pydicom
from conftest import write_series
from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.errors import EXCEPTION_NAME, Explained, admin_message, network_reason
from dicom_node.pipeline import Pipeline
from dicom_node.receive.headers import to_meta
from dicom_node.service import make_predictor
from storage.db import Database
from storage.filestore import FileStore
from storage.instances import Recorder
from storage.jobs import mark_judged
from storage.models import Event, Job
from storage.series import stable_series


def test_the_pattern_catches_exception_text():
    for text in ("AttributeError: 'FileDataset' object has no attribute 'PatientBirthDate'",
                 "in 30 s after: KeyError: (0010,0030)", "Traceback (most recent call last):",
                 "delivery failed: pacs: ConnectionRefusedError: [Errno 111]"):
        assert re.search(EXCEPTION_NAME, text), text


def test_known_failures_are_put_in_words():
    cases = {
        FileNotFoundError(2, "No such file", "/var/x.dcm"): "missing from the node's data folder",
        PermissionError(13, "denied"): "permissions of node.data_dir",
        OSError(errno.ENOSPC, "No space left on device"): "the disk is full",
        MemoryError(): "not enough memory while loading the images",
        ConnectionRefusedError(111, "refused"): "connection refused",
        TimeoutError(): "no answer from the peer in time",
        Explained("delivery failed: pacs: status 0xA700"): "delivery failed: pacs: status 0xA700",
        _sqlalchemy_error("database or disk is full"): "the database's disk is full while loading the images",
        _sqlalchemy_error("connection refused"): "the database could not be reached while loading the images",
    }
    for exc, words in cases.items():
        msg = admin_message(exc, "loading the images", 7)
        assert words in msg, (exc, msg)
        assert not re.search(EXCEPTION_NAME, msg), msg


def _sqlalchemy_error(text: str) -> Exception:
    """What SQLAlchemy raises for SQLite's SQLITE_FULL (a full disk) or a refused connection."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("COMMIT", {}, sqlite3.OperationalError(text))


def test_an_unknown_failure_names_the_stage_and_the_job_not_the_exception():
    msg = admin_message(AttributeError("'FileDataset' object has no attribute 'PatientBirthDate'"),
                        "encoding the SEG and SR", 42)
    assert msg == ("internal error while encoding the SEG and SR — see the node's log (debug level) for details; "
                   "report it with job 42")
    assert network_reason(ValueError("x")) == ""


def test_a_job_whose_images_vanished_says_so_and_logs_the_exception(tmp_path, caplog):
    """A real pipeline run (real model, SQLite): one stored image removed from disk before the job runs."""
    settings = load_settings(None, environ={"DICOM_NODE_NODE_DATA_DIR": str(tmp_path / "var")})
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    _, paths = write_series(tmp_path / "s", seed=71, n_slices=20, size=64)
    rec = Recorder(db)
    for p in paths:
        assert rec.record(to_meta(pydicom.dcmread(p, stop_before_pixels=True)), str(p), p.stat().st_size)
    time.sleep(0.05)
    (series_id,) = stable_series(db, 0.01)
    job_id = mark_judged(db, series_id, queue=True, reason="", expected_count=len(paths))
    paths[7].unlink()
    pipeline = Pipeline(settings, db, FileStore(tmp_path / "var", fsync=False), lambda: make_predictor(settings))
    with caplog.at_level(logging.DEBUG, logger="dicom_node.pipeline"):
        assert pipeline.run_next()
    with db.session() as s:
        job = s.get(Job, job_id)
        state, reason = job.state, job.reason
        detail = s.scalar(select(Event.detail).where(Event.job_id == job_id, Event.kind == "retry"))
    assert state == "queued"  # retried later: the admin may put the file back or re-send the series
    assert reason.startswith("a file the job needs is missing from the node's data folder while loading the images")
    assert not re.search(EXCEPTION_NAME, reason) and not re.search(EXCEPTION_NAME, detail), (reason, detail)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("FileNotFoundError" in m and "Traceback" in m for m in debug)  # for whoever debugs it


def test_a_worker_or_sender_loop_that_ends_by_itself_exits_non_zero():
    """``dicom-node worker`` and ``sender`` run their loop in a thread: if it ever ends without a stop signal the
    process exits 1 (systemd's Restart=on-failure brings it back) instead of 0 with nothing running."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); from dicom_node.service import _until_stopped\n"
            "def loop(stop):\n    raise RuntimeError('boom')\n_until_stopped(loop, 'worker')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the worker's loop ended unexpectedly" in r.stderr
