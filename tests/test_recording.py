"""Recording off the C-STORE path: batches commit, release waits for them, a refusing database loses nothing
and makes the listener answer Out of Resources, and files left without a row are recorded at start-up."""

from __future__ import annotations

import shutil
import sqlite3

import pydicom
from conftest import storescu, wait_for, write_series
from pynetdicom import AE
from sqlalchemy import func, select
from test_queue import meta

from dicom_node.config import load_settings
from dicom_node.receive.recovery import record_unrecorded
from dicom_node.receive.scp import StorageSCP
from dicom_node.service import open_storage
from storage.db import Database
from storage.filestore import FileStore
from storage.instances import Received, Recorder
from storage.models import Instance, Series
from storage.recording import BackgroundRecorder


def n_instances(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count(Instance.id)))


def test_batches_commit_and_flush_waits_for_them(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    counted = {"new": 0, "dup": 0}

    def tally(new: int, dup: int) -> None:
        counted["new"] += new
        counted["dup"] += dup

    w = BackgroundRecorder(Recorder(db), tally)
    w.start()
    try:
        for i in range(50):
            w.submit(Received(meta(i), f"p{i}", 1))
        for i in range(5):  # re-sent: recorded once
            w.submit(Received(meta(i), f"p{i}", 1))
        assert w.flush(10)
        assert n_instances(db) == 50
        with db.session() as s:
            assert s.scalar(select(Series.n_instances)) == 50
        assert counted == {"new": 50, "dup": 5}
    finally:
        w.stop()


def test_refusing_database_keeps_the_batch_until_it_accepts(tmp_path):
    path = tmp_path / "n.db"
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    w = BackgroundRecorder(Recorder(db))
    w.start()
    raw = sqlite3.connect(path)
    try:
        raw.execute("ALTER TABLE instances RENAME TO instances_away")  # every INSERT now fails
        raw.commit()
        for i in range(3):
            w.submit(Received(meta(i), f"p{i}", 1))
        wait_for(lambda: w.failing is not None, 10, 0.05, "the writer to report the failure")
        assert not w.flush(0.2) and w.backlog == 3
        raw.execute("ALTER TABLE instances_away RENAME TO instances")
        raw.commit()
        assert w.flush(30)
        assert w.failing is None and w.backlog == 0
        assert n_instances(db) == 3
    finally:
        raw.close()
        w.stop()


def test_rows_recorded_after_an_outage_carry_their_hold_in_the_same_transaction(tmp_path):
    """Rows recorded late carry their old arrival times, so their series look long quiet: the hold that keeps
    them from being judged before the senders resend is committed with the rows, not a moment after (the
    completion scan, every 2 s, could judge them in between). The recovery callback sees the hold already."""
    import datetime as dt

    from storage.models import utcnow

    path = tmp_path / "n.db"
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    w = BackgroundRecorder(Recorder(db))
    w.outage_hold_s = 300.0
    seen: list = []

    def recovered(batch: list[Received]) -> None:
        with db.session() as s:
            seen.extend(s.scalars(select(Series.quiet_until)))

    w.on_recovered = recovered
    w.start()
    raw = sqlite3.connect(path)
    try:
        w.submit(Received(meta(0), "p0", 1))  # before the outage: no hold
        assert w.flush(10)
        with db.session() as s:
            assert s.scalar(select(Series.quiet_until)) is None
        raw.execute("ALTER TABLE instances RENAME TO instances_away")
        raw.commit()
        w.submit(Received(meta(1), "p1", 1))
        wait_for(lambda: w.failing is not None, 10, 0.05, "the writer to report the failure")
        raw.execute("ALTER TABLE instances_away RENAME TO instances")
        raw.commit()
        assert w.flush(30)
        assert len(seen) == 1 and seen[0] is not None
        held = seen[0].replace(tzinfo=None) if seen[0].tzinfo else seen[0]
        now = utcnow().replace(tzinfo=None)
        assert now + dt.timedelta(seconds=250) < held < now + dt.timedelta(seconds=310)
    finally:
        raw.close()
        w.stop()


def test_listener_answers_out_of_resources_while_the_database_refuses(tmp_path):
    (tmp_path / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n'
        'network_timeout = 3\n')
    settings = load_settings(tmp_path / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    _, paths = write_series(tmp_path / "s", seed=41, n_slices=4, size=32)
    raw = sqlite3.connect(settings.data_dir / "node.db")
    try:
        raw.execute("ALTER TABLE instances RENAME TO instances_away")
        raw.commit()
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(pydicom.dcmread(paths[0]).SOPClassUID)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
        assert assoc.is_established
        assert assoc.send_c_store(paths[0]).Status == 0  # on disk: success, its row waits
        wait_for(lambda: scp.writer.failing is not None, 10, 0.05, "the writer to report the failure")
        assert assoc.send_c_store(paths[1]).Status == 0xA700
        assoc.release()  # confirmed after scp.network_timeout although the row is still pending
        assert len(list((settings.data_dir / "incoming").rglob("*.dcm"))) == 1
        raw.execute("ALTER TABLE instances_away RENAME TO instances")
        raw.commit()
        assert scp.writer.flush(30)
        assert n_instances(db) == 1
        assert scp.stats["refused"] == 1 and scp.stats["stored"] == 1
    finally:
        raw.close()
        scp.stop()
        db.dispose()


def test_release_is_confirmed_after_the_rows_are_committed(tmp_path):
    (tmp_path / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n')
    settings = load_settings(tmp_path / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    try:
        _, paths = write_series(tmp_path / "s", seed=42, n_slices=30, size=32)
        r = storescu(scp.port, tmp_path / "s")
        assert r.returncode == 0, r.stderr
        assert n_instances(db) == 30  # no waiting: storescu returned after the release was confirmed
    finally:
        scp.stop()
        db.dispose()


def test_start_up_recovery_records_files_without_rows(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    store = FileStore(tmp_path / "var", fsync=False)
    rec = Recorder(db)
    _, paths = write_series(tmp_path / "s", seed=43, n_slices=6, size=32)
    stored = []
    for p in paths:
        ds = pydicom.dcmread(p)
        dest = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        stored.append(dest)
    from dicom_node.receive.recovery import read_stored

    for dest in stored[:2]:  # these two made it into the database before the "crash"
        rec.record_batch([read_stored(dest)])
    series_dir = stored[0].parent
    (series_dir / ".x.dcm.0123.tmp").write_bytes(b"half")  # an interrupted write
    (series_dir / "1.2.3.999.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    assert record_unrecorded(store, rec) == 4
    assert n_instances(db) == 6
    with db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 6
        paths_in_db = set(s.scalars(select(Instance.path)))
    assert paths_in_db == {str(d) for d in stored}
    assert not (series_dir / ".x.dcm.0123.tmp").exists() and not (series_dir / "1.2.3.999.dcm").exists()
    assert len(list(store.quarantine.glob("*.bin"))) == 1
    assert "unreadable at start-up recovery" in next(store.quarantine.glob("*.txt")).read_text()
    assert record_unrecorded(store, rec) == 0  # nothing left: a second start records nothing


def test_a_row_the_database_rejects_is_left_out_and_the_rest_recorded(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rejected = []
    w = BackgroundRecorder(Recorder(db), on_rejected=lambda item, why: rejected.append((item.path, why)))
    w.start()
    try:
        bad = meta(2)
        bad.sop_class_uid = None  # NOT NULL: the database refuses this row for its content
        for i, m in enumerate([meta(0), meta(1), bad, meta(3)]):
            w.submit(Received(m, f"p{i}", 1))
        assert w.flush(30)
        assert w.failing is None and w.refusal() is None  # the listener goes on accepting
        assert n_instances(db) == 3
        assert [p for p, _ in rejected] == ["p2"] and "database rejected its row" in rejected[0][1]
    finally:
        w.stop()


def test_a_file_re_sent_after_the_purge_gets_its_path_back(tmp_path):
    from sqlalchemy import update

    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db)
    assert rec.record(meta(0), "first", 1)
    with db.session() as s:
        s.execute(update(Instance).values(path=""))  # what the retention purge leaves
    assert not rec.record(meta(0), "again", 2)  # still a duplicate: no second row, no new count
    with db.session() as s:
        assert s.scalar(select(Instance.path)) == "again"
        assert s.scalar(select(Series.n_instances)) == 1


def test_start_walks_incoming_only_after_an_unclean_stop(tmp_path):
    from dicom_node.receive.scp import CLEAN_STOP_MARKER

    (tmp_path / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n')
    settings = load_settings(tmp_path / "node.toml")
    db, store = open_storage(settings)
    marker = store.root / CLEAN_STOP_MARKER
    _, paths = write_series(tmp_path / "s", seed=44, n_slices=2, size=32)
    ds = pydicom.dcmread(paths[0])
    planted = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    try:
        scp = StorageSCP(settings, db, store)
        scp.start()
        assert not marker.exists()
        scp.stop()
        assert marker.exists()  # clean stop: every row committed
        planted.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[0], planted)  # a file without a row, as a kill would leave it
        scp = StorageSCP(settings, db, store)
        scp.start()  # after a clean stop the walk is skipped: the planted file stays unrecorded
        scp.stop()
        assert n_instances(db) == 0
        marker.unlink()  # an unclean stop leaves no marker
        scp = StorageSCP(settings, db, store)
        scp.start()
        assert n_instances(db) == 1 and not marker.exists()
        scp.stop()
    finally:
        db.dispose()
