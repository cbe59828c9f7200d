"""Delivery through the outbox against real peers: a PACS (dcmtk storescp) that is down while series arrive,
a destination that never comes back (give-up, webhooks, retry without re-encoding), and Storage Commitment
with a real Orthanc, including an instance Orthanc lost before it was asked to commit."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, free_port, storescu, wait_for, write_series

from storage.deliveries import OPEN

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = "/usr/sbin/Orthanc"
FAST_RETRY = "retry_initial_seconds = 1\nretry_max_seconds = 4\n"


def _timeline(node: NodeProcess, job_id: int) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from storage.models import Event

    db = node.db()
    try:
        with db.session() as s:
            return [
                (e.kind, e.detail) for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
            ]
    finally:
        db.dispose()


def _received(folder: Path) -> dict[str, list[str]]:
    """SOP Instance UIDs the PACS holds, by modality."""
    out: dict[str, list[str]] = {}
    for p in folder.iterdir():
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.setdefault(ds.Modality, []).append(ds.SOPInstanceUID)
    return out


def _metrics(node: NodeProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_outage_series_segmented_during_it_and_delivered_once_when_the_pacs_is_back(workdir):
    pacs = PacsSCP(workdir / "pacs")
    port = pacs.port
    pacs.stop(validate=False)  # the PACS is down before the first series arrives
    node = NodeProcess(workdir, pacs, dest_extra=FAST_RETRY)
    pacs2 = None
    try:
        uids = []
        for seed in (61, 62):
            _, paths = write_series(workdir / f"s{seed}", seed=seed)
            assert storescu(node.port, workdir / f"s{seed}").returncode == 0
            uids.append(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        # both are segmented during the outage: the worker never waits on the destination
        jobs = [node.wait_job(uid, states=("delivering",), timeout=120) for uid in uids]
        assert all(j["has_result"] for j in jobs)
        for j in jobs:
            wait_for(lambda: any(k == "retry" and "connection refused" in d  # waited on now, in this iteration
                                 for k, d in _timeline(node, j["job"])),  # noqa: B023
                     30, 0.5, "the refused connection on the timeline")
        # the outage goes on (six seconds more: the oldest delivery waits > 5 s, and with retries capped at 4 s
        # each is tried again at least once); the node keeps trying on the destination's clock
        time.sleep(6)
        r = node.cli("deliveries", "--json")
        assert r.returncode == 0, r.stderr
        listing = json.loads(r.stdout)
        (dest,) = listing["destinations"]
        assert dest["up"] is False and dest["waiting"] == 2 and "connection refused" in dest["last_error"]
        assert dest["oldest_waiting_s"] > 5
        assert {d["state"] for d in listing["deliveries"]} <= {"pending", "sending"}
        m = _metrics(node)
        assert 'dicomnode_destination_up{destination="pacs"} 0.0' in m
        assert 'dicomnode_deliveries_waiting{destination="pacs"} 2.0' in m
        # the PACS comes back on the same port: both go out by themselves
        pacs2 = PacsSCP(workdir / "pacs", port=port)
        done = [node.wait_job(uid, timeout=60) for uid in uids]
        assert [j["state"] for j in done] == ["done", "done"]
        got = _received(pacs2.folder)
        assert sorted(got) == ["SEG", "SR"]
        assert len(got["SEG"]) == 2 and len(set(got["SEG"])) == 2 and len(got["SR"]) == 2
        assert set(got["SEG"]) == {_seg_sop(node, j["job"]) for j in done}
        for j in done:
            kinds = [k for k, _ in _timeline(node, j["job"])]
            assert "requeued" not in kinds and kinds.count("encoded") == 1 and kinds[-1] == "delivered"
        assert 'dicomnode_destination_up{destination="pacs"} 1.0' in _metrics(node)
        r = node.cli("status", "--json")
        assert json.loads(r.stdout)["series"].get("done") == 2  # a series no longer says "queued" once done
    finally:
        node.stop()
        if pacs2:
            pacs2.stop()


def _seg_sop(node: NodeProcess, job_id: int) -> str:
    from storage.models import Job

    db = node.db()
    try:
        with db.session() as s:
            return s.get(Job, job_id).seg_sop_uid
    finally:
        db.dispose()


class _Webhook:
    """A tiny HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self):
        self.events: list[dict] = []
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def stop(self) -> None:
        self.server.shutdown()


def test_give_up_tells_the_admin_and_retry_sends_the_same_result_again(workdir):
    hook = _Webhook()
    dead = SimpleNamespace(aet="PACS", port=free_port())  # nothing listens there
    more = (f'[notifications]\nwebhooks = ["http://127.0.0.1:{hook.port}/hook"]\ntimeout_seconds = 2\n'
            'destination_down_minutes = 0.05\n')
    node = NodeProcess(workdir, dead, dest_extra=FAST_RETRY + "give_up_after_hours = 0.004\n", more=more)
    pacs = None
    try:
        _, paths = write_series(workdir / "s", seed=71)
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        assert storescu(node.port, workdir / "s").returncode == 0
        job = node.wait_job(ds.SeriesInstanceUID, states=("failed",), timeout=120)
        assert "given up after 0.004 h" in job["reason"] and "connection refused" in job["reason"]
        wait_for(lambda: {"destination-down", "delivery-failed", "job-failed"} <= set(hook.kinds()), 20, 0.3,
                 "the webhooks")
        down = next(e for e in hook.events if e["event"] == "destination-down")
        assert down["destination"] == "pacs" and "connection refused" in down["last_error"]
        given_up = next(e for e in hook.events if e["event"] == "delivery-failed")
        assert given_up["job"] == job["job"] and given_up["node"] == "SEGNODE"
        assert str(ds.PatientName) not in json.dumps(hook.events)  # no PHI in notifications
        r = node.cli("deliveries", "--state", "failed")
        assert r.returncode == 0 and "failed" in r.stdout and "given up" in r.stdout
        # the PACS is there now; the admin retries the job: the same SEG goes out, nothing is computed again
        pacs = PacsSCP(workdir / "pacs", port=dead.port)
        r = node.cli("retry", str(job["job"]))
        assert r.returncode == 0, r.stdout + r.stderr
        done = node.wait_job(ds.SeriesInstanceUID, states=("done",), timeout=60)
        assert _received(pacs.folder)["SEG"] == [_seg_sop(node, job["job"])]
        kinds = [k for k, _ in _timeline(node, job["job"])]
        assert kinds.count("running") == 1 and kinds.count("encoded") == 1 and "requeued" in kinds
        assert done["state"] == "done"
    finally:
        node.stop()
        hook.stop()
        if pacs:
            pacs.stop()


# ------------------------------------------------------------------------------------- Storage Commitment
#: Orthanc loses the first SR it stores (deleted through its REST API as soon as it is stored, before the
#: node asks for commitment): its commitment report then names that SR as failed.
LOSE_FIRST_SR = """
lost = false
function OnStoredInstance(instanceId, tags, metadata, origin)
  if not lost and tags['Modality'] == 'SR' then
    lost = true
    RestApiDelete('/instances/' .. instanceId)
    print('test: deleted the first SR ' .. instanceId)
  end
end
"""


def _api(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def orthanc_committing(workdir):
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc missing: install Debian's orthanc (the README's test command does)")
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()
    lua = workdir / "lose.lua"
    lua.write_text(LOSE_FIRST_SR)
    cfg = {"Name": "commitment test", "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
           "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "LuaScripts": [str(lua)],
           "DicomAlwaysAllowStore": True,
           # where Orthanc sends its Storage Commitment report (a new association to the node's listener)
           "DicomModalities": {"segnode": ["SEGNODE", "127.0.0.1", node_port]}}
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    with open(workdir / "orthanc.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([ORTHANC, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return _api(http_port, "/system")
        except Exception:
            return None

    wait_for(up, 60, 0.3, "Orthanc to start")
    node = NodeProcess(workdir, SimpleNamespace(aet="ORTHANC", port=dicom_port), port=node_port,
                       dest_extra=FAST_RETRY + "storage_commitment = true\ncommitment_timeout_seconds = 20\n")
    yield SimpleNamespace(node=node, http=http_port, tmp=workdir, log=workdir / "orthanc.log")
    node.stop()
    proc.terminate()
    proc.wait(20)
    shutil.rmtree(workdir / "db", ignore_errors=True)


def test_storage_commitment_with_orthanc_resends_what_it_lost(orthanc_committing):
    o = orthanc_committing
    sops = {}
    for seed in (81, 82):
        _, paths = write_series(o.tmp / f"s{seed}", seed=seed)
        assert storescu(o.node.port, o.tmp / f"s{seed}").returncode == 0
        sops[seed] = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    jobs = [o.node.wait_job(uid, states=("done", "failed"), timeout=180) for uid in sops.values()]
    assert [j["state"] for j in jobs] == ["done", "done"], [j["reason"] for j in jobs]
    # a job closes when its own rows are committed, but the listing holds every row: on a slow machine a row
    # of an earlier job of the same series can still wait for its report; wait until no row is open
    def settled():
        listing = json.loads(o.node.cli("deliveries", "--json").stdout)
        open_ = [d for d in listing["deliveries"] if d["state"] in OPEN]  # sent: waiting for its report here
        return None if open_ else listing

    listing = wait_for(settled, 120, 1.0, "every delivery to be committed or failed")
    assert {d["state"] for d in listing["deliveries"]} == {"committed"}, listing
    # Orthanc lost one SR before commitment: its report named it, the node sent it again, then it was committed
    # (every job's timeline: a series that looked complete early has an earlier job that was sent too)
    events = [e for j in o.node.jobs() for e in _timeline(o.node, j["job"])]
    lost = [d for k, d in events if k == "retry" and "Storage Commitment failed for 1 of 2 instances" in d]
    assert len(lost) == 1, events
    # one "committed" per delivery (3 for 2 was seen twice in slow runs before the outbox's state changes became
    # compare-and-set; test_deliveries races the answer with the sender deterministically)
    assert sum(1 for k, _ in events if k == "committed") == len(listing["deliveries"]), (events, listing)
    # and Orthanc holds every SEG and SR now
    held = {_api(o.http, f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in _api(o.http, "/instances")}
    for d in listing["deliveries"]:
        assert set(d["instances"]) <= held
    # the reports came to the node's own listener (an association Orthanc opened)
    assert "Storage Commitment answer from ORTHANC" in o.node.log.read_text()


# ------------------------------------------------------------------------------------- reasons in words
def _small_file(path: Path, sop_class: str) -> dict:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SEG"
    ds.save_as(path, enforce_file_format=True)
    return {"path": str(path), "sop_class": sop_class, "sop_uid": ds.SOPInstanceUID, "ts": ExplicitVRLittleEndian}


def test_reasons_are_recorded_as_they_are(tmp_path):
    """Rejected association (result/source/reason in words) and a refused C-STORE (status and meaning), from a
    real pynetdicom SCP; a refusal of one instance leaves the destination up."""
    from pynetdicom import AE, evt
    from sqlalchemy import select

    from dicom_node.config import Destination, Settings
    from dicom_node.deliver.outbox import Outbox
    from storage import deliveries
    from storage.db import Database
    from storage.models import Job, OutboxItem, Series, Study

    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    files = [_small_file(tmp_path / "SEG_binary.dcm", seg)]
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    with db.session() as s:
        st = Study(study_uid="2.25.5")
        s.add(st)
        s.flush()
        se = Series(series_uid="2.25.5.1", study_id=st.id, modality="MR", state="queued")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, state="running")
        s.add(job)
        s.flush()
        job_id = job.id
    deliveries.enqueue(db, job_id, {"pacs": files})

    scp = AE(ae_title="PACS")
    scp.add_supported_context(seg)
    scp.require_calling_aet = ["SOMEONE"]  # rejects the node: calling AE title not recognised
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        settings = Settings(destinations=[Destination(name="pacs", ae_title="PACS", port=port,
                                                      retry_initial_seconds=0.2, retry_max_seconds=0.2)])
        outbox = Outbox(settings, db, "host:1:sender")
        outbox.run_once()
        (d,) = deliveries.destination_summary(db, ["pacs"])
        assert d["up"] is False
        assert d["last_error"] == ("association rejected: rejected-permanent, source service-user, "
                                   "reason calling AE title not recognised")
        scp.require_calling_aet = []
        time.sleep(0.3)
        outbox.run_once()
        (d,) = deliveries.destination_summary(db, ["pacs"])
        assert d["up"] is True  # it answered; only this instance was refused
        with db.session() as s:
            row = s.scalar(select(OutboxItem))
            assert row.state == "pending" and "C-STORE status 0xA700 (Refused: Out of Resources)" in row.last_error
    finally:
        server.shutdown()
    time.sleep(0.3)  # past the row's own 0.2 s backoff
    outbox.run_once()  # nobody listens now
    (d,) = deliveries.destination_summary(db, ["pacs"])
    assert d["up"] is False and d["last_error"] == f"connection refused by 127.0.0.1:{port}"
    db.dispose()



def test_a_node_killed_before_the_pacs_answered_sends_the_same_result_again(workdir):
    """kill -9 while the PACS holds the SEG but has not answered yet: after the restart the very same files
    (same SOP Instance UIDs) go again; nothing is encoded twice."""
    import signal

    from sqlalchemy import select

    from storage.models import OutboxItem

    # storescp sleeps 1 s at each progress step of a C-STORE (every 128 KiB PDU) before it answers; +uf keeps
    # every copy it receives under its own name
    pacs = PacsSCP(workdir / "pacs", flags=("--sleep-during", "1", "--max-pdu", "131072", "+uf"))
    node = NodeProcess(workdir, pacs, dest_extra=FAST_RETRY)
    node2 = None
    try:
        _, paths = write_series(workdir / "s", seed=91)
        series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        assert storescu(node.port, workdir / "s").returncode == 0

        def sending():
            db = node.db()
            try:
                with db.session() as s:
                    return s.scalar(select(OutboxItem.id).where(OutboxItem.state == "sending"))
            finally:
                db.dispose()

        wait_for(sending, 120, 0.1, "the delivery to be on the wire")
        time.sleep(1.5)  # the PACS is receiving the SEG and has not answered
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        node2 = NodeProcess(workdir, pacs, dest_extra=FAST_RETRY)  # same folder and database
        try:
            job = node2.wait_job(series_uid, states=("done",), timeout=120)
        except AssertionError:
            raise AssertionError(node2.log.read_text()[-3000:]) from None
        events = _timeline(node2, job["job"])
        assert any("stopped before the answer; sending the same files again" in d for _, d in events), events
        kinds = [k for k, _ in events]
        assert kinds.count("encoded") == 1 and kinds.count("running") == 1
        got = _received(pacs.folder)
        assert set(got["SEG"]) == {_seg_sop(node2, job["job"])}  # copies, maybe, but never a different SEG
    finally:
        if node2:
            node2.stop()
        node.stop()
        pacs.stop()


def test_commitment_answered_on_the_sending_association(tmp_path):
    """An archive that answers the N-ACTION with an N-EVENT-REPORT on the same association (a real
    pynetdicom SCP that accepts the node's proposed SCP role): the delivery is committed on the spot."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from sqlalchemy import select

    from dicom_node.config import Destination, Settings
    from dicom_node.deliver.commitment import INSTANCE as COMMITMENT_INSTANCE
    from dicom_node.deliver.commitment import SOP_CLASS as COMMITMENT_SOP_CLASS
    from dicom_node.deliver.outbox import Outbox
    from storage import deliveries
    from storage.db import Database
    from storage.models import Job, OutboxItem, Series, Study

    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    files = [_small_file(tmp_path / "SEG_binary.dcm", seg), _small_file(tmp_path / "SR_binary.dcm", seg)]
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    with db.session() as s:
        st = Study(study_uid="2.25.6")
        s.add(st)
        s.flush()
        se = Series(series_uid="2.25.6.1", study_id=st.id, modality="MR", state="queued")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, state="running")
        s.add(job)
        s.flush()
        job_id = job.id
    deliveries.enqueue(db, job_id, {"archive": files})
    stored: set[str] = set()

    def on_store(event):
        stored.add(event.request.AffectedSOPInstanceUID)
        return 0x0000

    def on_action(event):
        req = event.action_information

        def report():
            time.sleep(0.2)
            info = Dataset()
            info.TransactionUID = req.TransactionUID
            info.ReferencedSOPSequence = [r for r in req.ReferencedSOPSequence if r.ReferencedSOPInstanceUID in stored]
            event.assoc.send_n_event_report(info, 1, COMMITMENT_SOP_CLASS, COMMITMENT_INSTANCE)

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    scp = AE(ae_title="ARCHIVE")
    scp.add_supported_context(seg)
    scp.add_supported_context(COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])
    try:
        settings = Settings(destinations=[Destination(name="archive", ae_title="ARCHIVE", port=port,
                                                      storage_commitment=True)])
        Outbox(settings, db, "host:1:sender").run_once()
        with db.session() as s:
            row = s.scalar(select(OutboxItem))
            assert row.state == "committed", row.last_error
            assert s.get(Job, job_id).state == "done"
    finally:
        server.shutdown()
        db.dispose()
