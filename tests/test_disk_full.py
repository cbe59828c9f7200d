"""The data folder's disk full under ``dicom-node worker`` (a 12 MB tmpfs, filled up): the job fails with the
disk named, recording that fails too, and the worker lives on — it lost its loop before, and sat idle holding
the job's lease — and once there is room again the job is taken again and done.

Needs a tmpfs mount (root in a container that allows it, as on CI's machines); skipped where it cannot mount."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import ENV, ROOT, free_port, wait_for, write_series

from dicom_node.config import load_settings
from dicom_node.learn.registry import ensure_registered
from dicom_node.receive.headers import to_meta
from dicom_node.service import open_storage
from storage.instances import Recorder
from storage.jobs import mark_judged
from storage.models import Job
from storage.series import stable_series


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path, leave_kb: int) -> Path:
    free_kb = shutil.disk_usage(disk).free // 1024
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free_kb - leave_kb) * 1024)
    return filler


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_full_disk_fails_the_job_in_words_and_the_worker_lives_on(tmp_path, small_disk, command):
    """``worker``, and ``serve`` (where the scheduler runs the jobs beside the listener, the dashboard, the
    sender and the corrections intake, each of which meets the full disk too)."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{small_disk / "var"}"\nlog_level = "INFO"\n'
                   f'[scp]\nmin_free_disk_mb = 1\nfsync = false\nbind_address = "127.0.0.1"\nport = {free_port()}\n'
                   f'[web]\nport = {free_port()}\n[inference]\nthreads = 1\n'
                   '[worker]\npoll_seconds = 0.3\nlease_seconds = 4\nretry_backoff_seconds = 0.5\n'
                   '[quality]\ntta = false\n')
    settings = load_settings(cfg)
    db, store = open_storage(settings)
    _, paths = write_series(tmp_path / "s", seed=91, n_slices=24, size=96)
    rec = Recorder(db)
    for p in paths:  # as the listener stores them: in the data folder, then a row
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        dest = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        assert rec.record(to_meta(ds), store.relative(dest), dest.stat().st_size)
    time.sleep(0.05)
    (series_id,) = stable_series(db, 0.01)
    job_id = mark_judged(db, series_id, queue=True, reason="", expected_count=len(paths))
    ensure_registered(settings, db)  # as the node did when it first started, before the disk filled up
    filler = _fill(small_disk, leave_kb=48)

    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(cfg), command], cwd=ROOT, env=ENV,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "job 1 failed" in log.read_text(), 120, 0.3, "the job to fail on the full disk")
        time.sleep(2)
        assert worker.poll() is None, log.read_text()  # alive, its loop too (it was a dead thread before)
        text = log.read_text()
        assert "disk is full while" in text, text
        assert "could not be reached" not in text and "Traceback" not in text, text
        filler.unlink()  # room again: the job, its lease over, is taken again and done by the same worker
        wait_for(lambda: _state(db, job_id) == "done", 120, 0.5, "the job to be done once there is room")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        db.dispose()
    assert worker.returncode == 0, log.read_text()


def _state(db, job_id: int) -> str:
    with db.session() as s:
        return s.get(Job, job_id).state
