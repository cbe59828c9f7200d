"""The listener under hostile input (issue 12): malformed PDUs, trickling, idle and flooding callers, UIDs that
would leave the data folder or share a file, lax commands and negotiation, echo during a database outage.

The node's listener runs in this process (StorageSCP as ``serve`` builds it, short timeouts), so each test
takes seconds; the peers are dcmtk's echoscu/storescu and a bare socket client (rawdicom.py) that sends
exactly the bytes a test needs. Traffic "from another host" comes from 127.0.0.2/127.0.0.3 (Linux answers
the whole of 127.0.0.0/8 on loopback).
"""

from __future__ import annotations

import copy
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import rawdicom as raw
from conftest import DCMTK, ENV, storescu, wait_for, write_series

from dicom_node.config import load_settings
from dicom_node.receive.scp import StorageSCP
from dicom_node.service import open_storage

ARTIM = 1.5  # scp.association_request_timeout in these tests
NETWORK = 3  # scp.network_timeout


def make_scp(tmp: Path, extra: str = "") -> StorageSCP:
    (tmp / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n'
        f'min_free_disk_mb = 1\nnetwork_timeout = {NETWORK}\nassociation_request_timeout = {ARTIM}\n'
        f'max_associations = 6\nmax_associations_per_peer = 3\n'
        # room for the deadline tests' tricklers from the same address as their ordinary senders (the per-address
        # connection cap has its own tests: test_hostile_connections.py)
        f'max_connections_per_peer = 20\n{extra}\n')
    settings = load_settings(tmp / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path):
    s = make_scp(tmp_path, 'allowed_peers = ["127.0.0.1/32", "127.0.0.2/32"]')
    yield s
    s.stop()
    s.db.dispose()


def echo(port: int, called: str = "SEGNODE") -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK["echoscu"], "-to", "20", "-aet", "GOODSCU", "-aec", called, "127.0.0.1", str(port)],
                          env=ENV, capture_output=True, text=True, timeout=60)


def n_instances(scp: StorageSCP) -> int:
    from sqlalchemy import func, select

    from storage.models import Instance

    with scp.db.session() as s:
        return s.scalar(select(func.count()).select_from(Instance))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- malformed PDUs
MALFORMED = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS ClientHello on the plain port": bytes.fromhex("160301002e0100002a0303") + b"\x00" * 40,
    "unknown PDU type": struct.pack(">BBI", 0x42, 0, 4) + b"abcd",
    "P-DATA before association": raw.p_data(1, b"\x00" * 10, True),
    "A-ASSOCIATE-RQ announcing 1 GB": struct.pack(">BBI", 0x01, 0, 1 << 30) + b"\x00" * 64,
    "undecodable A-ASSOCIATE-RQ": struct.pack(">BBI", 0x01, 0, 8) + b"\xff" * 8,
    "A-RELEASE-RQ first": struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4,
}


def test_malformed_pdus_are_aborted_and_logged(scp, caplog):
    port = scp.port
    for name, data in MALFORMED.items():
        s = raw.connect(port)
        s.sendall(data)
        assert raw.closed_within(s, ARTIM + 3) is not None, f"{name}: connection not closed"
        s.close()
    assert "TLS handshake on the plain port" in caplog.text
    assert "exceeds our maximum" in caplog.text
    assert echo(port).returncode == 0


def test_malformed_command_and_oversized_pdu_on_an_association_are_aborted(scp):
    s, _ = raw.associate(scp.port, (raw.MR_IMAGE,))
    s.sendall(raw.p_data(1, b"\x01\x02\x03", True))  # a command set that is not one
    assert raw.closed_within(s, 5) is not None
    s, _ = raw.associate(scp.port, (raw.MR_IMAGE,))
    s.sendall(struct.pack(">BBI", 0x04, 0, 64 << 20))  # a P-DATA-TF of 64 MB (we accept 1 MB)
    assert raw.closed_within(s, 5) is not None
    assert echo(scp.port).returncode == 0


# ------------------------------------------------------------------------------------------- deadlines
def _trickle(port: int, source: str, payload: bytes, every: float, out: list, lock: threading.Lock) -> None:
    """Send ``payload`` one byte every ``every`` seconds; record how long the node kept the connection."""
    try:
        s = raw.connect(port, source)
    except OSError:
        with lock:
            out.append(("refused", 0.0))
        return
    t0 = time.monotonic()
    s.settimeout(every)
    try:
        for b in payload:
            s.sendall(bytes([b]))
            try:
                if s.recv(65536) == b"":
                    break
            except TimeoutError:
                continue
    except OSError:
        pass
    finally:
        with lock:
            out.append(("dropped", time.monotonic() - t0))
        s.close()


def _established_trickle(port: int, source: str, every: float, out: list, lock: threading.Lock) -> None:
    """An association that is accepted, then trickles a P-DATA-TF a byte at a time."""
    s = raw.connect(port, source)
    s.sendall(raw.associate_rq(abstract_syntaxes=(raw.MR_IMAGE,)))
    pdu = raw.read_pdu(s)
    if pdu is None or pdu[0] != 0x02:
        with lock:
            out.append(("rejected", pdu[1][1:4] if pdu else None))
        s.close()
        return
    t0 = time.monotonic()
    _trickle_on(s, raw.p_data(1, raw.c_store_command(raw.MR_IMAGE, "1.2.3"), True), every)
    with lock:
        out.append(("dropped-established", time.monotonic() - t0))
    s.close()


def _trickle_on(s: socket.socket, payload: bytes, every: float) -> None:
    s.settimeout(every)
    try:
        for b in payload:
            s.sendall(bytes([b]))
            try:
                if s.recv(65536) == b"":
                    return
            except TimeoutError:
                continue
    except OSError:
        return


def test_trickling_and_idle_callers_are_dropped_while_ordinary_senders_succeed(scp, tmp_path, caplog):
    """20 trickling associations (10 inside their A-ASSOCIATE-RQ from our own address, 10 accepted ones from
    another host trickling a PDU), plus idle connections; dcmtk's echoscu and storescu still succeed, and
    every trickler is dropped by its deadline."""
    port = scp.port
    out: list = []
    lock = threading.Lock()
    rq = raw.associate_rq(abstract_syntaxes=(raw.VERIFICATION,))
    threads = [threading.Thread(target=_trickle, args=(port, "127.0.0.1", rq, 0.5, out, lock)) for _ in range(10)]
    threads += [threading.Thread(target=_established_trickle, args=(port, "127.0.0.2", 0.5, out, lock))
                for _ in range(10)]
    idle = [raw.connect(port, "127.0.0.1") for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    _, paths = write_series(tmp_path / "s", seed=61, n_slices=4, size=32)
    t0 = time.monotonic()
    assert echo(port).returncode == 0
    r = storescu(port, tmp_path / "s", aet="GOODSCU")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < ARTIM + 10
    for t in threads:
        t.join(30)
    assert n_instances(scp) == 4
    kinds = [k for k, _ in out]
    # one address holds at most max_associations_per_peer (3) slots; the others were told so (transient RJ)
    assert kinds.count("dropped-established") == 3 and kinds.count("rejected") == 7
    assert all(why == bytes((2, 3, 2)) for k, why in out if k == "rejected")
    assert all(secs < ARTIM + 1.5 for k, secs in out if k == "dropped"), out
    assert all(NETWORK - 0.5 < secs < NETWORK + 1.5 for k, secs in out if k == "dropped-established"), out
    for s in idle:
        assert raw.closed_within(s, ARTIM + 1) is not None  # long since closed: nothing arrived in time
        s.close()
    log = caplog.text
    assert "no complete A-ASSOCIATE-RQ within 1.5 s of connect (scp.association_request_timeout)" in log
    assert "no complete PDU within 3 s (scp.network_timeout)" in log
    assert "scp.max_associations_per_peer" in log
    wait_for(lambda: scp.server.open_connections == 0, 10, 0.1, "every connection to be closed")


def test_a_flood_of_connections_costs_neither_threads_nor_memory(scp):
    """500 connections each announcing a 1 MB A-ASSOCIATE-RQ: those beyond the hard cap are closed at accept
    (no thread), the admitted ones hold only what they sent; an ordinary echo still succeeds meanwhile."""
    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    threads0, rss0 = threading.active_count(), rss_mb()
    socks = []
    for _ in range(500):
        try:
            s = raw.connect(scp.port, "127.0.0.2", timeout=2)
            s.sendall(struct.pack(">BBI", 0x01, 0, 1 << 20) + b"\x00" * 1000)
            socks.append(s)
        except OSError:
            pass
    time.sleep(0.5)
    cap = scp.server.max_connections
    assert scp.server.open_connections <= cap
    assert threading.active_count() - threads0 <= cap + 2
    assert rss_mb() - rss0 < 60
    for s in socks:
        s.close()
    wait_for(lambda: scp.server.open_connections == 0, 10, 0.1, "the flood's connections to be closed")
    assert echo(scp.port).returncode == 0


def test_peer_outside_the_allowlist_is_closed_before_anything_is_read(scp, caplog):
    s = raw.connect(scp.port, "127.0.0.3")
    assert raw.closed_within(s, 1.0) is not None  # closed at once, without sending a byte
    s.close()
    assert "connection from 127.0.0.3 closed at connect: address not in scp.allowed_peers" in caplog.text


# ------------------------------------------------------------------------------------------- negotiation
def test_called_ae_title_not_ours_is_rejected_with_reason_7(scp, caplog):
    s = raw.connect(scp.port)
    s.sendall(raw.associate_rq(called="SOMEONEELSE"))
    pdu = raw.read_pdu(s)
    s.close()
    assert pdu is not None and pdu[0] == 0x03 and pdu[1][1:4] == bytes((1, 1, 7))
    assert echo(scp.port, called="SOMEONEELSE").returncode != 0
    assert "called AE title 'SOMEONEELSE' is not ours" in caplog.text


def test_promiscuous_mode_accepts_any_called_ae_title(tmp_path):
    scp = make_scp(tmp_path, "require_called_ae = false")
    try:
        assert echo(scp.port, called="ANYTHING").returncode == 0
    finally:
        scp.stop()
        scp.db.dispose()


def test_association_without_an_acceptable_context_is_rejected(scp, caplog):
    s = raw.connect(scp.port)
    s.sendall(raw.associate_rq(abstract_syntaxes=("1.2.826.0.1.3680043.8.498.4242.1",)))
    pdu = raw.read_pdu(s)
    s.close()
    assert pdu is not None and pdu[0] == 0x03 and pdu[1][1:4] == bytes((1, 1, 1))
    assert "no acceptable presentation context" in caplog.text


# ------------------------------------------------------------------------------------------- UIDs and paths
@pytest.fixture
def instance(tmp_path) -> pydicom.Dataset:
    _, paths = write_series(tmp_path / "one", seed=62, n_slices=1, size=32)
    return pydicom.dcmread(paths[0])


def _store(port: int, ds: pydicom.Dataset, sop_class: str | None = "same", sop_instance: str | None = "same",
           context: str = raw.MR_IMAGE) -> int | None:
    s, _ = raw.associate(port, (raw.MR_IMAGE, raw.CT_IMAGE))
    cid = 1 if context == raw.MR_IMAGE else 3
    try:
        return raw.c_store(s, cid, ds.SOPClassUID if sop_class == "same" else sop_class,
                           ds.SOPInstanceUID if sop_instance == "same" else sop_instance, raw.dataset_bytes(ds))
    finally:
        raw.release(s)


def quarantine_reasons(scp: StorageSCP) -> str:
    return "".join(p.read_text() for p in (scp.store.root / "quarantine").glob("*.txt"))


def test_traversal_uids_are_refused_and_nothing_leaves_the_data_folder(scp, instance, tmp_path):
    outside_before = files_under(tmp_path) - files_under(scp.store.root)
    ds = instance
    ds.StudyInstanceUID = ".."
    ds.SeriesInstanceUID = ".."
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "ZZTRAVERSAL"
    assert _store(scp.port, ds) == 0xC000  # the command's Affected SOP Instance UID is no UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    assert _store(scp.port, ds) == 0xC000  # the study and series UIDs are no UIDs
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7/../../x"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.8"
    assert _store(scp.port, ds) == 0xC000
    assert files_under(tmp_path) - files_under(scp.store.root) == outside_before
    assert not list((scp.store.root / "incoming").rglob("*.dcm"))
    assert n_instances(scp) == 0
    reasons = quarantine_reasons(scp)
    assert "Affected SOP Instance UID is not a valid DICOM UID" in reasons
    assert "Study Instance UID is not a valid DICOM UID" in reasons


def test_colliding_uids_never_overwrite_an_acknowledged_instance(scp, instance):
    ds = instance
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.777.1"
    assert _store(scp.port, ds) == 0x0000
    (stored,) = list((scp.store.root / "incoming").rglob("*.dcm"))
    before = stored.read_bytes()
    for uid in ("1.2.826.777 1", "1.2.826.777_1", "1.2.826.777.01", "1.2.826.777.1."):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.PatientName = "Other^Patient"
        assert _store(scp.port, ds) == 0xC000, uid
    assert stored.read_bytes() == before
    assert list((scp.store.root / "incoming").rglob("*.dcm")) == [stored]
    wait_for(lambda: n_instances(scp) == 1, 10, 0.1, "the acknowledged instance's row")


def test_commands_that_lack_fields_or_do_not_match_their_context_are_refused(scp, instance):
    assert _store(scp.port, instance, sop_class=None) == 0xC000  # no Affected SOP Class UID
    assert _store(scp.port, instance, sop_instance=None) == 0xC000  # no Affected SOP Instance UID
    assert _store(scp.port, instance, sop_class=raw.CT_IMAGE) == 0x0122  # CT command on the MR context
    ct = copy.deepcopy(instance)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = raw.CT_IMAGE
    assert _store(scp.port, ct, sop_class=raw.MR_IMAGE) == 0xA900  # CT data set on an MR context and command
    reasons = quarantine_reasons(scp)
    assert "Affected SOP Class UID missing" in reasons and "Affected SOP Instance UID missing" in reasons
    assert "differs from its presentation context's" in reasons
    assert "SOP Class UID in the dataset" in reasons and "status 0xA900" in reasons
    assert n_instances(scp) == 0
    assert _store(scp.port, instance) == 0x0000  # the same instance, told the truth, is stored


# ------------------------------------------------------------------------------------------- database outage
def test_echo_and_release_do_not_wait_for_a_database_that_cannot_commit(tmp_path):
    """An echo-only association is released at once while the database refuses rows (PACS health probes);
    an association that stored an instance still waits for its row (up to scp.release_wait_seconds, here 3 s)."""
    scp = make_scp(tmp_path)
    sql = sqlite3.connect(scp.settings.data_dir / "node.db")
    try:
        _, paths = write_series(tmp_path / "s", seed=63, n_slices=2, size=32)
        sql.execute("ALTER TABLE instances RENAME TO instances_away")
        sql.commit()
        t0 = time.monotonic()
        r = storescu(scp.port, paths[0], aet="GOODSCU")
        assert r.returncode == 0  # on disk: success; the release waited for its row scp.release_wait_seconds
        assert time.monotonic() - t0 > NETWORK - 0.5
        assert scp.writer.failing is not None
        t0 = time.monotonic()
        assert echo(scp.port).returncode == 0
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        r = storescu(scp.port, paths[1], aet="GOODSCU")
        assert r.returncode != 0  # answered 0xA700 Out of Resources: nothing stored
        assert len(list((scp.store.root / "incoming").rglob("*.dcm"))) == 1
        assert time.monotonic() - t0 < 2.0  # ... so its release does not wait either
        sql.execute("ALTER TABLE instances_away RENAME TO instances")
        sql.commit()
        assert scp.writer.flush(30)
    finally:
        sql.close()
        scp.stop()
        scp.db.dispose()


def test_pdu_deadline_is_for_the_whole_pdu_not_per_read(scp):
    """A C-STORE whose P-DATA-TF arrives at one byte per 0.5 s never completes within scp.network_timeout:
    dropped after it, not kept alive by each byte."""
    s, _ = raw.associate(scp.port, (raw.MR_IMAGE,))
    t0 = time.monotonic()
    _trickle_on(s, raw.p_data(1, raw.c_store_command(raw.MR_IMAGE, "1.2.3"), True) * 3, 0.5)
    took = time.monotonic() - t0
    s.close()
    assert NETWORK - 0.5 < took < NETWORK + 1.5


def test_the_file_store_refuses_unsafe_names_itself(tmp_path):
    """The second guard: whatever a future caller passes, the store builds no path outside its folders and maps
    no two different values to one name."""
    from storage.filestore import FileStore, UnsafePath

    store = FileStore(tmp_path / "var", fsync=False)
    uid = "1.2.826.0.1.3680043.8.498.5"
    for bad in ("..", ".", "", "1/../../x", "/etc/passwd", "1.2 3", "1.2_3", "1" * 65, "1\x00"):
        with pytest.raises(UnsafePath):
            store.instance_path(bad, uid, uid)
        with pytest.raises(UnsafePath):
            store.instance_path(uid, uid, bad)
        with pytest.raises(UnsafePath):
            store.result_path(bad, "job1")
    with pytest.raises(UnsafePath):
        store.result_path(uid, "../job1")
    with pytest.raises(UnsafePath):
        FileStore._contained(str(tmp_path), "a/../../b")
    assert store.instance_path(uid, uid, uid + ".1") != store.instance_path(uid, uid, uid + "1")
    assert store.instance_path(uid, uid, uid).is_relative_to(store.incoming)


# ------------------------------------------------------------------------------------------- memory bombs
def _big_instance(tmp_path: Path, size: int = 1024) -> pydicom.Dataset:
    """A valid single-frame MR image of size² 16-bit pixels (1024²: 2 MB)."""
    _, paths = write_series(tmp_path / f"big{size}", seed=64, n_slices=1, size=size)
    return pydicom.dcmread(paths[0])


def test_a_data_set_larger_than_max_instance_mb_is_read_not_held_and_refused(tmp_path, caplog):
    """scp.max_instance_mb bounds what one association holds: a larger data set (here a valid 2 MB image
    against 1 MB) is read to its end but not buffered, answered 0xA700, kept nowhere; the association goes on
    and the next instance is stored. Before the bound, fragments were appended without end (1.5 GB sent on one
    association: the node's memory grew by 1.5 GB, and the data were written to quarantine)."""
    scp = make_scp(tmp_path, "max_instance_mb = 1")
    try:
        big = _big_instance(tmp_path)
        data = raw.dataset_bytes(big)
        assert len(data) > 2 << 20
        small = _big_instance(tmp_path, 64)
        s, _ = raw.associate(scp.port, (raw.MR_IMAGE,))
        try:
            assert raw.c_store(s, 1, big.SOPClassUID, big.SOPInstanceUID, data, fragment=256 << 10) == 0xA700
            assert raw.c_store(s, 1, small.SOPClassUID, small.SOPInstanceUID, raw.dataset_bytes(small)) == 0x0000
        finally:
            assert raw.release(s)
        assert "larger than scp.max_instance_mb (1 MB)" in caplog.text
        assert not list((scp.store.root / "quarantine").glob("*"))
        assert len(list((scp.store.root / "incoming").rglob("*.dcm"))) == 1
        assert scp.stats["refused"] == 1
    finally:
        scp.stop()
        scp.db.dispose()


def test_a_deflate_bomb_and_pixels_that_would_decode_past_the_bound_are_refused(tmp_path):
    """A few hundred kilobytes of deflate that inflate to 64 MB, and a JPEG image announcing 65535² pixels x 1000
    frames (8 TB decoded), are refused with 0xC000 and quarantined with the reason, without inflating or
    decoding past scp.max_instance_mb."""
    import zlib

    scp = make_scp(tmp_path, "max_instance_mb = 8")
    try:
        ds = _big_instance(tmp_path, 32)
        ds.add_new(0x00091010, "LO", "BOMB")  # private creator
        ds.add_new(0x00091110, "OB", b"\x00" * (64 << 20))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4711"
        plain = raw.dataset_bytes(ds)
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = packer.compress(plain) + packer.flush()
        assert len(deflated) < 1 << 20
        s, _ = raw.associate(scp.port, (raw.MR_IMAGE,), transfer_syntax="1.2.840.10008.1.2.1.99")
        try:
            assert raw.c_store(s, 1, ds.SOPClassUID, ds.SOPInstanceUID, deflated, fragment=256 << 10) == 0xC000
        finally:
            raw.release(s)

        jpeg = _big_instance(tmp_path, 32)
        jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4712"
        jpeg.Rows = jpeg.Columns = 65535
        jpeg.NumberOfFrames = 1000
        jpeg.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xd9"])
        jpeg["PixelData"].VR = "OB"
        jpeg["PixelData"].is_undefined_length = True
        jpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
        buf = __import__("io").BytesIO()
        pydicom.dcmwrite(buf, jpeg, enforce_file_format=True)
        body = buf.getvalue()
        body = body[132 + 12 + struct.unpack_from("<I", body, 132 + 8)[0]:]
        s, _ = raw.associate(scp.port, (raw.MR_IMAGE,), transfer_syntax="1.2.840.10008.1.2.4.70")
        try:
            assert raw.c_store(s, 1, jpeg.SOPClassUID, jpeg.SOPInstanceUID, body) == 0xC000
        finally:
            raw.release(s)
        reasons = quarantine_reasons(scp)
        assert "inflates to more than scp.max_instance_mb (8 MB)" in reasons
        assert "would decode to" in reasons and "65535 x 65535 x 1000 frames" in reasons
        assert not list((scp.store.root / "incoming").rglob("*.dcm"))
    finally:
        scp.stop()
        scp.db.dispose()


def test_refused_data_sets_fill_quarantine_only_up_to_its_bound(tmp_path, caplog, monkeypatch):
    """scp.quarantine_max_mb bounds the copies of refused data sets: past it a refused instance is still refused
    with its status and counted, the log says once that copies are no longer kept, and good instances are
    stored as before. Before the bound, a peer sending bad data sets on and on filled the disk until the disk
    floor refused the PACS's images too. Room an admin makes is found again without a restart."""
    import storage.quarantine as quarantine

    scp = make_scp(tmp_path, "quarantine_max_mb = 1")
    folder = scp.store.root / "quarantine"
    try:
        bad = _big_instance(tmp_path, 384)  # ~300 KB
        bad.StudyInstanceUID = "1.2.3.x"  # no UID: 0xC000
        for k in range(6):
            bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.55.{k}"
            assert _store(scp.port, bad) == 0xC000
        kept = list(folder.glob("*.bin"))
        assert len(kept) == 3, kept
        assert quarantine.folder_bytes(folder) <= 1 << 20
        assert scp.stats["refused"] == 6
        assert caplog.text.count("no longer kept") == 1
        # one line for the six refusals of one address and status (a flood is told once per interval)
        assert caplog.text.count("C-STORE from 127.0.0.1 refused (0xC000)") == 1
        good = _big_instance(tmp_path, 64)
        assert _store(scp.port, good) == 0x0000

        for p in folder.iterdir():  # an admin inspects and clears the folder
            p.unlink()
        monkeypatch.setattr(quarantine, "REMEASURE_EVERY_S", 0.0)
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.55.9"
        assert _store(scp.port, bad) == 0xC000
        assert len(list(folder.glob("*.bin"))) == 1
    finally:
        scp.stop()
        scp.db.dispose()


def test_no_refused_data_set_is_kept_when_the_bound_is_zero(tmp_path, instance):
    scp = make_scp(tmp_path, "quarantine_max_mb = 0")
    try:
        instance.StudyInstanceUID = ".."
        assert _store(scp.port, instance) == 0xC000
        assert not list((scp.store.root / "quarantine").iterdir())
        assert scp.stats["refused"] == 1
    finally:
        scp.stop()
        scp.db.dispose()


def _refused_once(port: int, ds: pydicom.Dataset, uid: str, source: str = "127.0.0.1") -> int | None:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    s, _ = raw.associate(port, (raw.MR_IMAGE,), source=source)
    try:
        return raw.c_store(s, 1, ds.SOPClassUID, uid, raw.dataset_bytes(ds))
    finally:
        raw.release(s)


def test_a_flood_of_refused_data_sets_is_told_once_per_interval_and_address(tmp_path, caplog):
    """A sender whose every data set is refused (a misconfigured modality, or an attacker) was logged line by
    line, as fast as it sent: now once per interval for its address and status, then with the count of those
    not told. Another address is told on its own."""
    scp = make_scp(tmp_path)
    try:
        bad = _big_instance(tmp_path, 16)
        bad.StudyInstanceUID = "1.2.3.x"  # no UID: 0xC000
        for k in range(20):
            assert _refused_once(scp.port, bad, f"1.2.826.0.1.3680043.8.498.56.{k}") == 0xC000
        assert caplog.text.count("C-STORE from 127.0.0.1 refused (0xC000)") == 1
        assert scp.stats["refused"] == 20
        assert _refused_once(scp.port, bad, "1.2.826.0.1.3680043.8.498.56.99", "127.0.0.3") == 0xC000
        assert caplog.text.count("C-STORE from 127.0.0.3 refused (0xC000)") == 1
        scp._store_refusals._quiet_until.clear()  # the interval over: the next line counts those not told
        assert _refused_once(scp.port, bad, "1.2.826.0.1.3680043.8.498.56.98") == 0xC000
        assert "(and 19 more like it" in caplog.text
    finally:
        scp.stop()
        scp.db.dispose()
