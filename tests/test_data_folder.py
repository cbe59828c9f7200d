"""A node's data folder can move: the database names files relative to it, so a folder restored from a
backup to a new path (or mounted elsewhere) serves its previews and sends its results again; a stored path
never leads outside the folder."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, wait_for, write_series
from sqlalchemy import select

from storage.filestore import FileStore, UnsafePath, resolve_stored, stored_path


def test_paths_are_stored_relative_and_read_in_the_folder_as_it_is_now(tmp_path):
    store = FileStore(tmp_path / "var")
    path = store.instance_path("1.2", "1.3", "1.4")
    assert store.relative(path) == "incoming/1.2/1.3/1.4.dcm"
    assert store.resolve("incoming/1.2/1.3/1.4.dcm") == path
    moved = FileStore(tmp_path / "new-disk" / "var")
    assert moved.resolve(store.relative(path)) == tmp_path / "new-disk" / "var" / "incoming" / "1.2" / "1.3" / "1.4.dcm"
    # a relative data_dir is taken from the working folder, and stored paths still come out relative
    assert stored_path("var", Path("var") / "results" / "1.2" / "job1" / "SEG_binary.dcm") \
        == "results/1.2/job1/SEG_binary.dcm"
    # a file outside the folder keeps its absolute path, and such a row is read where it points
    assert store.relative("/srv/elsewhere/x.dcm") == "/srv/elsewhere/x.dcm"
    assert store.resolve("/srv/elsewhere/x.dcm") == Path("/srv/elsewhere/x.dcm")
    assert store.resolve("incoming/../results/1.2/job1/SEG.dcm") == store.results / "1.2" / "job1" / "SEG.dcm"


@pytest.mark.parametrize("stored", ["../node.db", "incoming/../../x.dcm", "results/1.2/../../../../etc/passwd",
                                    "..", "."])
def test_a_stored_path_never_leads_outside_the_folder(tmp_path, stored):
    with pytest.raises(UnsafePath, match="outside the data folder"):
        resolve_stored(tmp_path / "var", stored)


def test_an_empty_stored_path_is_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="purged"):
        resolve_stored(tmp_path, "")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _segs_for(pacs: PacsSCP, series_uid: str) -> list[Path]:
    out = []
    for p in pacs.files():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.Modality == "SEG" and series_uid in {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence}:
            out.append(p)
    return out


def test_a_node_restored_into_a_new_folder_previews_and_sends_again(tmp_path):
    """Backed up while running (``dicom-node backup``), stopped, its folder gone; the copy, started at another
    path, shows the preview and re-sends the SEG (same SOP Instance UID) to the PACS."""
    pacs = PacsSCP(tmp_path / "pacs", flags=("+uf",))  # unique file names: a second copy of the SEG is a new file
    allowed = 'allowed_calling_aets = ["GOODSCU", "STORESCU", "DICOMNODE"]'
    first = NodeProcess(tmp_path, pacs, name="first", extra=allowed)
    second = None
    try:
        _, paths = write_series(tmp_path / "series", seed=41)
        series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        assert storescu(first.port, tmp_path / "series").returncode == 0
        job = first.wait_job(series_uid)
        assert job["state"] == "done", job
        [seg] = wait_for(lambda: _segs_for(pacs, series_uid), 60, 0.3, "the SEG at the PACS")
        seg_uid = pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID

        backup = tmp_path / "backup"
        r = first.cli("backup", str(backup))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (backup / "node.db").is_file() and (backup / "incoming").is_dir() and (backup / "results").is_dir()
        first.stop()
        gone = first.dir.rename(tmp_path / "first-gone")  # the old folder is not there to fall back on

        # restore: the copy becomes the new node's data folder (node.db in it, as the default database)
        shutil.copytree(backup, tmp_path / "second" / "var")
        second = NodeProcess(tmp_path, pacs, name="second", extra=allowed)
        assert second.data_dir.resolve() != (gone / "var").resolve()

        db = second.db()
        try:
            from storage.models import Instance, Job, OutboxItem

            with db.session() as s:
                stored = s.scalars(select(Instance.path)).all()
                seg_path = s.scalar(select(Job.seg_path).where(Job.id == job["job"]))
                outbox = s.scalars(select(OutboxItem).where(OutboxItem.job_id == job["job"])).all()
            assert stored and all(p.startswith("incoming/") for p in stored), stored[:3]
            assert seg_path.startswith("results/"), seg_path
            assert all(f["path"].startswith("results/") for o in outbox for f in json.loads(o.files))
        finally:
            db.dispose()

        wait_for(lambda: "dashboard on" in second.log.read_text(), 90, 0.3, "the restored node's dashboard")
        status, png = _get(f"http://127.0.0.1:{second.web_port}/jobs/{job['job']}/preview.png")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", (status, png[:200])
        shown = second.cli("show", str(job["job"])).stdout
        assert f"result: {second.data_dir.resolve() / 'results'}" in shown, shown

        # re-delivery from the restored folder: the same SEG reaches the PACS again
        r = second.cli("deliveries", "--requeue", str(outbox[0].id))
        assert r.returncode == 0 and "1 deliveries queued again" in r.stdout, r.stdout + r.stderr
        again = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(_segs_for(pacs, series_uid)),
                         90, 0.5, "the SEG sent again from the restored node")
        assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in again} == {seg_uid}

        # re-segmentation from the restored images: with its result gone, a retried job is computed again
        shutil.rmtree(second.data_dir / Path(seg_path).parent)
        r = second.cli("retry", str(job["job"]))
        assert r.returncode == 0 and "queued again" in r.stdout, r.stdout + r.stderr
        redone = second.wait_job(series_uid)
        assert redone["state"] == "done", redone
        assert (second.data_dir / seg_path).is_file()
        timeline = second.cli("show", str(job["job"])).stdout
        assert timeline.count(" encoded ") == 2 and timeline.count(" requeued ") == 2, timeline
        log = second.log.read_text()
        assert "result file missing" not in log and "outside the data folder" not in log
    finally:
        first.stop()
        if second is not None:
            second.stop()
        pacs.stop()


def test_an_outbox_row_whose_path_leads_outside_the_folder_is_not_sent(tmp_path):
    """A stored path with ``..`` names a real file outside the data folder: the row fails as one with a missing
    file would (its own backoff, the reason in words), nothing is read from there, the destination stays up."""
    from test_outbox import _small_file

    from dicom_node.config import Destination, Settings
    from dicom_node.deliver.outbox import Outbox
    from storage import deliveries
    from storage.db import Database
    from storage.models import Job, OutboxItem, Series, Study

    (tmp_path / "outside").mkdir()
    f = _small_file(tmp_path / "outside" / "SEG_binary.dcm", "1.2.840.10008.5.1.4.1.1.66.4")
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    with db.session() as s:
        study = Study(study_uid="2.25.7")
        s.add(study)
        s.flush()
        series = Series(series_uid="2.25.7.1", study_id=study.id, modality="MR", state="queued")
        s.add(series)
        s.flush()
        job = Job(series_id=series.id, state="running")
        s.add(job)
        s.flush()
        job_id = job.id
    deliveries.enqueue(db, job_id, {"pacs": [{**f, "path": "../outside/SEG_binary.dcm"}]})
    settings = Settings(destinations=[Destination(name="pacs", ae_title="PACS", port=9)])  # nobody listens
    settings.node.data_dir = tmp_path / "var"
    Outbox(settings, db, "host:1:sender").run_once()
    with db.session() as s:
        row = s.scalar(select(OutboxItem))
        assert row.state == "pending" and row.attempts == 1
        assert row.last_error.startswith("result file missing: its recorded path leads outside the data folder")
    (d,) = deliveries.destination_summary(db, ["pacs"])
    assert d["up"] is True  # no connection was tried for it
    db.dispose()


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"), reason="TEST_DATABASE_URL not set (.ci/run sets it)")
def test_backup_of_a_postgresql_node_is_a_dump_and_the_folder(tmp_path):
    import subprocess
    import sys

    from conftest import ENV, ROOT

    folder = tmp_path / "var" / "incoming" / "1.2" / "1.3"
    folder.mkdir(parents=True)
    (folder / "1.4.dcm").write_bytes(b"instance")
    (folder / ".1.5.dcm.0123.tmp").write_bytes(b"half-written")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "var"\ndatabase_url = "{os.environ["TEST_DATABASE_URL"]}"\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(cfg), "backup", str(tmp_path / "out")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / "incoming" / "1.2" / "1.3" / "1.4.dcm").read_bytes() == b"instance"
    assert not (tmp_path / "out" / "incoming" / "1.2" / "1.3" / ".1.5.dcm.0123.tmp").exists()
    listed = subprocess.run(["pg_restore", "--list", str(tmp_path / "out" / "node.pgdump")], capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "Format: CUSTOM" in listed.stdout


def test_a_folder_a_command_cannot_write_is_named_with_the_reason(tmp_path):
    """A target that is a file, or a folder that cannot be made: an answer the admin can act on, no traceback."""
    import subprocess
    import sys

    from conftest import ENV, ROOT

    (tmp_path / "a-file").write_text("")
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\ndata_dir = "var"\n')
    for dest, says in ((tmp_path / "a-file", "is a file: give a new folder"),
                       (tmp_path / "a-file" / "backup", f"({tmp_path / 'a-file' / 'backup'}); whatever was copied")):
        r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(cfg), "backup", str(dest)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("backup failed: ") and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # any command's folder that cannot be made: the reason and the path
    r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(cfg), "phantoms", "--cases", "1", "--out",
                        str(tmp_path / "a-file" / "phantoms")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr == f"error: Not a directory ({tmp_path / 'a-file' / 'phantoms'})\n", r.stderr
