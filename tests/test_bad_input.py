"""Bad input gets its documented answer, the node keeps running, and nothing already stored is lost."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from conftest import DCMTK, ENV, NodeProcess, storescu, write_series
from pynetdicom import AE, _config


def raw_send(port: int, path, aet: str = "GOODSCU") -> int | None:
    """C-STORE a file's bytes as they are (pynetdicom's chunked file sending does not parse the dataset)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=aet)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
        assert assoc.is_established
        try:
            st = assoc.send_c_store(path)
            return int(st.Status) if st else None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _count_instances(node) -> int:
    from sqlalchemy import func, select

    from storage.models import Instance

    db = node.db()
    try:
        with db.session() as s:
            return s.scalar(select(func.count()).select_from(Instance))
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def stored_before(node, tmp_path_factory):
    """A series stored before the bad input arrives; checked again at the end."""
    d = tmp_path_factory.mktemp("before")
    _, paths = write_series(d / "s", seed=21)
    assert storescu(node.port, d / "s").returncode == 0
    return paths


def test_truncated_file_is_refused_with_c000(node, stored_before, workdir):
    _, paths = write_series(workdir / "t", seed=22, n_slices=2)
    data = paths[0].read_bytes()
    bad = workdir / "truncated.dcm"
    bad.write_bytes(data[: len(data) - 5000])
    n = _count_instances(node)
    assert raw_send(node.port, bad) == 0xC000
    assert _count_instances(node) == n
    assert any((node.data_dir / "quarantine").glob("*.bin"))


def test_bytes_that_are_not_dicom_are_refused_with_c000(node, stored_before, workdir):
    _, paths = write_series(workdir / "g", seed=23, n_slices=1)
    ds = pydicom.dcmread(paths[0])
    # a valid file meta header followed by random bytes instead of a dataset
    buf = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(buf), ds.file_meta)
    garbage = workdir / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + np.random.default_rng(0).bytes(5000))
    assert raw_send(node.port, garbage) == 0xC000
    assert node.alive()


def test_unknown_sop_class_is_not_accepted(node, stored_before, workdir):
    _, paths = write_series(workdir / "u", seed=24, n_slices=1)
    ds = pydicom.dcmread(paths[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.4242.1"
    ds.save_as(workdir / "unknown.dcm")
    r = storescu(node.port, workdir / "unknown.dcm")
    assert r.returncode != 0
    assert "presentation context" in (r.stdout + r.stderr).lower()
    assert node.alive()


def test_caller_not_on_allowlist_is_rejected(node, stored_before):
    r = subprocess.run([DCMTK["echoscu"], "-aet", "INTRUDER", "-aec", "SEGNODE", "127.0.0.1", str(node.port)],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "reject" in (r.stdout + r.stderr).lower()
    assert "calling AE title 'INTRUDER' not in scp.allowed_calling_aets" in node.log.read_text()


def test_mixed_orientations_are_skipped_with_reason(node, stored_before, workdir):
    _, paths = write_series(workdir / "m", seed=25)
    for p in paths[::2]:
        ds = pydicom.dcmread(p)
        c, s = np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))
        ds.ImageOrientationPatient = [c, s, 0, -s, c, 0]
        ds.save_as(p)
    assert storescu(node.port, workdir / "m").returncode == 0
    job = node.wait_job(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert job["state"] == "skipped"
    assert "mixed orientations" in job["reason"]
    assert "skipped: mixed orientations" in node.cli("jobs").stdout


def test_non_lower_limb_series_is_skipped_with_reason(node, stored_before, workdir):
    _, paths = write_series(workdir / "h", seed=26, series_description="AX T2 BRAIN", body_part="HEAD")
    for p in paths:  # the study description of the phantom says LOWER LIMBS: make it a head study
        ds = pydicom.dcmread(p)
        ds.StudyDescription = "MRI HEAD"
        ds.save_as(p)
    assert storescu(node.port, workdir / "h").returncode == 0
    job = node.wait_job(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert job["state"] == "skipped" and "no lower-limb term" in job["reason"]


def test_nothing_stored_was_lost(node, stored_before):
    assert node.alive()
    from sqlalchemy import select

    from storage.filestore import resolve_stored
    from storage.models import Instance

    db = node.db()
    try:
        with db.session() as s:
            rows = {r.sop_uid: r.path for r in s.scalars(select(Instance))}
    finally:
        db.dispose()
    for p in stored_before:
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        assert uid in rows
        assert pydicom.dcmread(resolve_stored(node.data_dir, rows[uid])).SOPInstanceUID == uid


def test_disk_floor_answers_out_of_resources(tmp_path, workdir):
    n = NodeProcess(tmp_path, None, extra="min_free_disk_mb = 1000000000", name="full")
    try:
        _, paths = write_series(workdir / "d", seed=27, n_slices=1)
        assert raw_send(n.port, paths[0]) == 0xA700
        assert not list((n.data_dir / "incoming").rglob("*.dcm"))
    finally:
        n.stop()


def test_peer_address_not_on_allowlist_is_rejected(tmp_path):
    n = NodeProcess(tmp_path, None, extra='allowed_peers = ["10.0.0.0/8"]', name="peers", wait_echo=False)
    try:
        r = subprocess.run([DCMTK["echoscu"], "-aet", "GOODSCU", "-aec", "SEGNODE", "127.0.0.1", str(n.port)],
                           env=ENV, capture_output=True, text=True)
        assert r.returncode != 0
        assert n.alive()
        # refused at accept, before a byte of the request is read
        assert "127.0.0.1 closed at connect: address not in scp.allowed_peers" in n.log.read_text()
    finally:
        n.stop()
