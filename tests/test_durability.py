"""The queue holds under failure, on SQLite and on a real PostgreSQL (URL from $TEST_DATABASE_URL, which
.ci/run sets): several worker processes drain a queue with every job run exactly once, a worker killed
with SIGKILL has its job finished by another after the lease expires, and a node killed mid-ingest has
every acknowledged instance on disk and in the database after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from conftest import ENV, NodeProcess, wait_for, write_series
from sqlalchemy import create_engine, func, select, text

from storage.db import Database
from storage.filestore import resolve_stored
from storage.models import Event, Instance, Job, Series, Study, utcnow

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TEST_DATABASE_URL", "")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    if not PG_URL:
        pytest.skip("TEST_DATABASE_URL not set (.ci/run sets it to the local PostgreSQL)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def config(tmp_path: Path, url: str, lease: float = 30.0, model: Path | None = None) -> Path:
    p = tmp_path / "worker.toml"
    model_line = f'model_path = "{model}"\n' if model else ""
    p.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\ndatabase_url = "{url}"\nlog_level = "INFO"\n'
                 f'[scp]\nport = 0\n[inference]\ndevice = "cpu"\nthreads = 1\n{model_line}'
                 f'[worker]\npoll_seconds = 0.2\nlease_seconds = {lease}\nretry_backoff_seconds = 0.5\n'
                 '[quality]\ntta = false\n')  # these tests are about the queue: one network pass per job
    return p


def queue_jobs(db: Database, paths: list[Path], n_jobs: int) -> list[int]:
    """n_jobs queued jobs, each on its own series whose instances are the given files."""
    metas = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ids = []
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == metas[0].StudyInstanceUID))
        if study is None:
            study = Study(study_uid=metas[0].StudyInstanceUID)
            s.add(study)
            s.flush()
        for _ in range(n_jobs):
            se = Series(series_uid=f"2.25.{uuid.uuid4().int}", study_id=study.id, modality="MR", state="queued",
                        n_instances=len(paths))
            s.add(se)
            s.flush()
            for p, m in zip(paths, metas):
                s.add(Instance(sop_uid=f"2.25.{uuid.uuid4().int}", series_id=se.id, sop_class_uid=m.SOPClassUID,
                               path=str(p), rows=m.Rows, columns=m.Columns,
                               position="\\".join(map(str, m.ImagePositionPatient)),
                               orientation="\\".join(map(str, m.ImageOrientationPatient)),
                               pixel_spacing="\\".join(map(str, m.PixelSpacing)),
                               frame_of_reference_uid=m.FrameOfReferenceUID))
            job = Job(series_id=se.id, state="queued", created_at=utcnow())
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def start_worker(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(cfg), "worker"], cwd=ROOT, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_migrations_match_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    db = Database(db_url)
    db.create_schema()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.dispose()
    assert diff == []


def test_migration_stores_paths_under_the_data_folder_relative(db_url, tmp_path):
    """Rows written with absolute paths become relative to the configured data folder (and back on downgrade);
    paths elsewhere stay as they are; without the folder the migration refuses rather than guess."""
    import json

    from alembic import command

    from storage.db import alembic_config
    from storage.filestore import FileStore
    from storage.models import OutboxItem

    db = Database(db_url)
    with db.engine.begin() as conn:
        cfg = alembic_config(db_url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    data = tmp_path / "var"
    inside = str(data / "incoming" / "1.2" / "1.3" / "1.4.dcm")
    seg = str(data / "results" / "1.2" / "job1" / "SEG_binary.dcm")
    elsewhere = "/srv/old-node/var/incoming/1.2/1.3/1.5.dcm"
    with db.session() as s:
        study = Study(study_uid="1.2")
        s.add(study)
        s.flush()
        series = Series(series_uid="1.3", study_id=study.id)
        s.add(series)
        s.flush()
        s.add_all([Instance(sop_uid=uid, series_id=series.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", path=p)
                   for uid, p in (("1.4", inside), ("1.5", elsewhere), ("1.6", ""))])
        job = Job(series_id=series.id, seg_path=seg)
        s.add(job)
        s.flush()
        s.add(OutboxItem(job_id=job.id, destination="pacs", files=json.dumps(
            [{"path": seg, "sop_class": "1.2.840.10008.5.1.4.1.1.66.4", "sop_uid": "1.9"},
             {"path": elsewhere, "sop_class": "1.2.840.10008.5.1.4.1.1.88.33", "sop_uid": "1.10"}])))
        job_id = job.id

    def rows():
        with db.session() as s:
            paths = dict(s.execute(select(Instance.sop_uid, Instance.path)).all())
            files = [f["path"] for f in json.loads(s.scalar(select(OutboxItem.files)))]
            return paths, s.get(Job, job_id).seg_path, files

    with pytest.raises(Exception, match="needs the node's data folder"):
        db.create_schema()
    assert rows() == ({"1.4": inside, "1.5": elsewhere, "1.6": ""}, seg, [seg, elsewhere])
    db.create_schema(data)
    paths, seg_path, files = rows()
    assert paths == {"1.4": "incoming/1.2/1.3/1.4.dcm", "1.5": elsewhere, "1.6": ""}
    assert seg_path == "results/1.2/job1/SEG_binary.dcm" and files == [seg_path, elsewhere]
    moved = FileStore(tmp_path / "moved")
    assert moved.resolve(paths["1.4"]) == tmp_path / "moved" / "incoming" / "1.2" / "1.3" / "1.4.dcm"
    assert moved.resolve(paths["1.5"]) == Path(elsewhere)
    with db.engine.begin() as conn:
        cfg = alembic_config(db_url)
        cfg.attributes["connection"] = conn
        cfg.attributes["data_dir"] = str(data)
        command.downgrade(cfg, "0003")
    assert rows() == ({"1.4": inside, "1.5": elsewhere, "1.6": ""}, seg, [seg, elsewhere])
    db.dispose()


@pytest.fixture(scope="module")
def small_input_model(tmp_path_factory) -> Path:
    """The bundled network with its card's input size set to 32 (the U-Net is fully convolutional, so the
    same weights run): a job's network pass costs a 64th of the 256² one. For the tests of the queue, where
    what the model finds does not matter and 300 passes at 256² were most of a run (0.7 s each on 2 cores)."""
    from inference.model import BUNDLED_MODEL
    from inference.model_card import load_checkpoint, save_checkpoint

    weights, card = load_checkpoint(BUNDLED_MODEL)
    card.input_size = 32
    path = tmp_path_factory.mktemp("model") / "small-input.safetensors"
    save_checkpoint(path, weights, card)
    return path


def test_three_workers_drain_300_jobs_each_exactly_once(db_url, tmp_path, small_input_model):
    _, paths = write_series(tmp_path / "one", seed=31, n_slices=1, size=32)
    db = Database(db_url)
    db.create_schema()
    ids = queue_jobs(db, paths, 300)
    cfg = config(tmp_path, db_url, model=small_input_model)
    workers = [start_worker(cfg, tmp_path / f"w{i}.log") for i in range(3)]
    try:
        def drained():
            for w in workers:
                assert w.poll() is None, (tmp_path / "w0.log").read_text()[-2000:]
            with db.session() as s:
                return s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) == 300

        wait_for(drained, 600, 1.0, "300 jobs done")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(60)
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(ids))).all()
        assert all(j.state == "done" and j.attempts == 1 for j in jobs)
        runs = s.execute(select(Event.job_id, func.count()).where(Event.kind == "running").group_by(Event.job_id)).all()
        assert len(runs) == 300 and all(n == 1 for _, n in runs)
        owners = {e.detail.split(" by ")[1] for e in s.scalars(select(Event).where(Event.kind == "running"))}
        assert len(owners) == 3, owners  # all three took part
    db.dispose()


@pytest.mark.slow
def test_killed_worker_job_finishes_on_another_after_lease_expiry(db_url, tmp_path):
    _, paths = write_series(tmp_path / "big", seed=32, n_slices=48, size=256)
    db = Database(db_url)
    db.create_schema()
    (job_id,) = queue_jobs(db, paths, 1)
    cfg = config(tmp_path, db_url, lease=3.0)
    a = start_worker(cfg, tmp_path / "a.log")
    try:
        def running():
            with db.session() as s:
                return s.get(Job, job_id).state == "running"

        wait_for(running, 120, 0.1, "worker A to start the job")
        time.sleep(0.5)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        b = start_worker(cfg, tmp_path / "b.log")
        try:
            def done():
                with db.session() as s:
                    return s.get(Job, job_id).state == "done"

            wait_for(done, 180, 0.3, "worker B to finish the job")
        finally:
            b.send_signal(signal.SIGTERM)
            b.wait(60)
    finally:
        if a.poll() is None:
            a.kill()
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2
        details = [e.detail for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == "running"))]
        assert len(details) == 2 and "lease expired" in details[1]
    db.dispose()


def test_node_killed_mid_ingest_keeps_every_acknowledged_instance(db_url, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    _, paths = write_series(tmp_path / "s", seed=33, n_slices=150, size=128)
    url = "" if db_url.startswith("sqlite") else db_url
    node = NodeProcess(tmp_path, None, name="n", database_url=url)
    acked: list[str] = []
    ae = AE(ae_title="GOODSCU")
    ae.dimse_timeout = ae.network_timeout = 5  # the peer dies mid-association: do not wait 30 s to notice
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        for i, p in enumerate(paths):
            if i == 60:
                node.proc.send_signal(signal.SIGKILL)
            try:
                st = assoc.send_c_store(p)
            except Exception:
                break
            if st and st.Status == 0:
                acked.append(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.abort()
    node.proc.wait(10)
    assert 60 <= len(acked) < len(paths)
    restarted = NodeProcess(tmp_path, None, name="n", database_url=url)  # same folder and database
    try:
        db = restarted.db()
        with db.session() as s:
            stored = {i.sop_uid: i.path for i in s.scalars(select(Instance))}
        db.dispose()
        for uid in acked:
            assert uid in stored
            assert pydicom.dcmread(resolve_stored(restarted.data_dir, stored[uid]),
                                   stop_before_pixels=True).SOPInstanceUID == uid
    finally:
        restarted.stop()


def test_retry_and_requeue_commands_and_retention_purge(tmp_path):
    from storage.instances import purge_delivered_images

    _, paths = write_series(tmp_path / "one", seed=34, n_slices=1, size=32)
    copies = []
    for i in range(3):
        p = tmp_path / f"copy{i}.dcm"
        p.write_bytes(paths[0].read_bytes())
        copies.append(p)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    db = Database(url)
    db.create_schema()
    ids = [queue_jobs(db, [c], 1)[0] for c in copies]
    with db.session() as s:
        for j in ids[:2]:
            s.get(Job, j).state = "failed"
        s.get(Job, ids[2]).state = "done"
        s.get(Job, ids[2]).finished_at = utcnow()
    cfg = config(tmp_path, url)

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(cfg), *a], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    r = run("retry", str(ids[0]))
    assert r.returncode == 0 and "queued again" in r.stdout
    r = run("requeue", "--failed")
    assert r.returncode == 0 and "1 failed jobs queued again" in r.stdout
    with db.session() as s:
        assert [s.get(Job, j).state for j in ids] == ["queued", "queued", "done"]
    # retention: the delivered series' image is removed, the queued ones' are kept
    assert purge_delivered_images(db, hours=0, root=tmp_path) == 1
    assert not copies[2].exists() and copies[0].exists() and copies[1].exists()
    db.dispose()
