"""Release and stop answer within seconds whatever the database, a destination or a running job do: a release
does not wait on a database that refuses rows (the instances are on disk; the start-up recovery records them),
and SIGTERM ends ``serve`` within 10 s with a job running and the PACS hanging, the job taken again and the
result delivered at the next start.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import NodeProcess, PacsSCP, storescu, wait_for, write_series
from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.receive.scp import CLEAN_STOP_MARKER, StorageSCP
from dicom_node.service import open_storage
from storage.models import Instance, Job, Series
from storage.states import JobState

STOP_S = 10.0


def listener(tmp: Path) -> StorageSCP:
    (tmp / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n'
        'min_free_disk_mb = 1\nnetwork_timeout = 30\nrelease_wait_seconds = 2\n')
    settings = load_settings(tmp / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    return scp


def recorded(scp: StorageSCP) -> int:
    with scp.db.session() as s:
        return len(s.scalars(select(Instance.id)).all())


def test_release_is_answered_within_seconds_while_the_database_refuses_rows(tmp_path, caplog):
    """storescu's release is confirmed after scp.release_wait_seconds (2 s), not scp.network_timeout (30 s),
    while every batch of rows fails; the instances are on disk, the log says the start-up recovery records them,
    and it does once the database is back."""
    scp = listener(tmp_path)
    _, paths = write_series(tmp_path / "s", seed=71, n_slices=3, size=32)
    sql = sqlite3.connect(scp.settings.data_dir / "node.db")
    try:
        sql.execute("ALTER TABLE instances RENAME TO instances_away")
        sql.commit()
        t0 = time.monotonic()
        r = storescu(scp.port, *paths, aet="GOODSCU")
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr  # stored and released: no "Release Failed"
        assert 1.5 < took < 6.0, took
        assert "scp.release_wait_seconds" in caplog.text and "start-up recovery" in caplog.text
        assert len(list((scp.store.root / "incoming").rglob("*.dcm"))) == 3
        t0 = time.monotonic()
        scp.stop()  # the database still refuses: the stop does not wait for it either
        assert time.monotonic() - t0 < 6.0
        assert not (scp.store.root / CLEAN_STOP_MARKER).exists()
        sql.execute("ALTER TABLE instances_away RENAME TO instances")
        sql.commit()
    finally:
        sql.close()
        scp.stop()
        scp.db.dispose()
    again = StorageSCP(scp.settings, *open_storage(scp.settings))
    again.start()  # no clean-stop marker: the start-up recovery records the three acknowledged instances
    try:
        assert recorded(again) == 3
    finally:
        again.stop()
        again.db.dispose()


@dataclass
class Peer:
    aet: str
    port: int


def job_states(node: NodeProcess) -> dict[str, str]:
    db = node.db()
    try:
        with db.session() as s:
            return {uid: state for uid, state in s.execute(select(Series.series_uid, Job.state).join(Job))}
    finally:
        db.dispose()


def series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_sigterm_stops_within_10_s_with_a_job_running_and_the_pacs_hanging(tmp_path):
    """The PACS accepts TCP but never answers (the sender waits on its A-ASSOCIATE-AC) and a job is running
    when SIGTERM arrives: ``serve`` exits within 10 s. At the next start, with the PACS back, the job is taken
    again and both series' results reach the PACS."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)  # never accepted: connections complete in the kernel and then nothing is said
    node = NodeProcess(tmp_path, Peer("PACS", hanging.getsockname()[1]), name="node",
                       worker="lease_seconds = 60", more="[inference]\nthreads = 1\n")
    pacs = None
    try:
        _, first = write_series(tmp_path / "a", seed=72, n_slices=24, size=64)
        assert storescu(node.port, *first, aet="GOODSCU").returncode == 0
        a = series_uid(first[0])
        wait_for(lambda: job_states(node).get(a) == JobState.DELIVERING, 120, 0.2, "the first result in the outbox")
        time.sleep(1.0)  # the sender is now waiting on the hanging PACS
        # long enough to outlast the stop budget, so the stop has a job to leave behind: 96 slices (one pass,
        # one torch thread) took 5 s on an idle machine and ended inside the stop; 240 take about 12 s
        _, second = write_series(tmp_path / "b", seed=73, n_slices=240, size=128)
        assert storescu(node.port, *second, aet="GOODSCU").returncode == 0
        b = series_uid(second[0])
        wait_for(lambda: job_states(node).get(b) == JobState.RUNNING, 60, 0.1, "the second job to run")
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(30)
        took = time.monotonic() - t0
        log = node.log.read_text()
        assert took < STOP_S, f"stop took {took:.1f} s:\n{log[-3000:]}"
        assert node.proc.returncode == 0
        assert "left running at stop" in log, log[-3000:]
        (node.dir / "first-run.log").write_text(log)  # the restart writes node.log afresh
        hanging.close()
        pacs = PacsSCP(tmp_path / "pacs")
        node = NodeProcess(tmp_path, pacs, name="node", worker="lease_seconds = 60", more="[inference]\nthreads = 1\n")
        wait_for(lambda: len(pacs.files()) >= 4, 180, 0.5, "both series' SEG and SR at the PACS")
        assert "interrupted by the last shutdown" in node.log.read_text()
    finally:
        node.stop()
        hanging.close()
        if pacs is not None:
            pacs.stop(validate=False)  # the results' conformance is other tests' subject
