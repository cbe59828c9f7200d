"""A down destination is probed on its own short interval (C-ECHO, or a QIDO request for STOW), apart from the
deliveries' backoff: a PACS back after an outage gets its results within ``probe_seconds``, not after the
rest of a backoff grown to ``retry_max_seconds``. Against real peers (dcmtk storescp, a pynetdicom SCP, a
tiny HTTP server) and with the probe's rules alone (one in flight, on its interval, none once stopping)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
from conftest import NodeProcess, PacsSCP, free_port, storescu, wait_for, write_series
from test_outbox import _received, _seg_sop, _small_file, _timeline, _Webhook

from dicom_node.config import Destination, Settings
from dicom_node.deliver.dimse import echo
from dicom_node.deliver.probe import Prober, echo_destination, query_destination

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
#: the backoff already at its maximum from the first failure: without the probe the PACS would wait 300 s
GROWN_BACKOFF = "retry_initial_seconds = 300\nretry_max_seconds = 300\n"


def test_a_returning_pacs_gets_the_results_within_the_probe_interval_once_each(workdir):
    probe_seconds = 2
    pacs = PacsSCP(workdir / "pacs")
    port = pacs.port
    pacs.stop(validate=False)  # down before the series arrives
    hook = _Webhook()
    more = (f'[notifications]\nwebhooks = ["http://127.0.0.1:{hook.port}/hook"]\ntimeout_seconds = 2\n'
            'destination_down_minutes = 0.02\n')
    node = NodeProcess(workdir, pacs, dest_extra=GROWN_BACKOFF + f"probe_seconds = {probe_seconds}\n", more=more)
    pacs2 = None
    try:
        _, paths = write_series(workdir / "s", seed=81)
        uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        assert storescu(node.port, workdir / "s").returncode == 0
        job = node.wait_job(uid, states=("delivering",), timeout=120)
        wait_for(lambda: any(k == "retry" and "connection refused" in d and "next try in 300 s" in d
                             for k, d in _timeline(node, job["job"])), 30, 0.3, "the refused delivery")
        wait_for(lambda: "destination-down" in hook.kinds(), 20, 0.3, "the destination-down webhook")
        time.sleep(2.5 * probe_seconds)  # probes fail meanwhile; they are no deliveries
        listing = json.loads(node.cli("deliveries", "--json").stdout)
        (row,) = listing["deliveries"]
        assert row["state"] == "pending" and row["attempts"] == 1
        # what the admin sees: the backoff's retry minutes away, and the probe that will not wait for it
        (dest,) = listing["destinations"]
        assert dest["up"] is False and dest["next_try"] and dest["probe_every_s"] == probe_seconds
        assert f"probed every {probe_seconds} s" in node.cli("deliveries").stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/", timeout=10) as r:
            assert f"probed every {probe_seconds} s" in r.read().decode()
        # the PACS is back on the same port: the next probe wakes the waiting delivery, no admin involved
        pacs2 = PacsSCP(workdir / "pacs", port=port)
        back = time.monotonic()
        done = node.wait_job(uid, states=("done", "failed"), timeout=probe_seconds + 30)
        took = time.monotonic() - back
        assert done["state"] == "done"
        assert took <= probe_seconds + 10, f"delivered {took:.1f} s after the PACS came back"
        got = _received(pacs2.folder)
        assert got["SEG"] == [_seg_sop(node, job["job"])] and len(got["SR"]) == 1  # once each
        kinds = [k for k, _ in _timeline(node, job["job"])]
        assert kinds.count("sent") == 1 and "requeued" not in kinds and kinds[-1] == "delivered"
        wait_for(lambda: "destination-up" in hook.kinds(), 20, 0.3, "the destination-up webhook")
        assert "answered a probe" in node.log.read_text()
    finally:
        node.stop()
        hook.stop()
        if pacs2:
            pacs2.stop()


# ------------------------------------------------------------------------------------- the sender woken
def _one_row(tmp_path, destination: str):
    from storage import deliveries
    from storage.db import Database
    from storage.models import Job, Series, Study

    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    with db.session() as s:
        st = Study(study_uid="2.25.8")
        s.add(st)
        s.flush()
        se = Series(series_uid="2.25.8.1", study_id=st.id, modality="MR", state="queued")
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, state="running")
        s.add(job)
        s.flush()
        job_id = job.id
    deliveries.enqueue(db, job_id, {destination: [_small_file(tmp_path / "SEG_binary.dcm", SEG)]})
    return db, job_id


def test_the_first_good_probe_wakes_the_sleeping_sender(tmp_path):
    """The sender polls only every 30 s and the backoff is 300 s: the probe alone (every 2 s) brings the row
    out, at once after the probe's answer (the loop is woken, not left to sleep until its next look), and
    nothing is probed while the destination is up."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification
    from sqlalchemy import select

    from dicom_node.config.sections import SenderSettings
    from dicom_node.deliver.outbox import Outbox
    from storage import deliveries
    from storage.models import OutboxItem

    db, _ = _one_row(tmp_path, "pacs")
    port = free_port()
    dest = Destination(name="pacs", ae_title="PACS", port=port, retry_initial_seconds=300, retry_max_seconds=300,
                       probe_seconds=2)
    settings = Settings(destinations=[dest], sender=SenderSettings(poll_seconds=30))
    outbox = Outbox(settings, db, "host:1:sender")
    probes: list[str] = []
    answered: list[float] = []
    real = outbox.prober._check

    def check(d: Destination) -> str:
        probes.append(d.name)
        reason = real(d)
        if not reason:
            answered.append(time.monotonic())
        return reason

    outbox.prober._check = check
    outbox.run_once()  # nobody listens: down, the row waits 300 s
    (d,) = deliveries.destination_summary(db, ["pacs"])
    assert d["up"] is False and deliveries.destination_wait(db, "pacs") > 250

    stop = threading.Event()
    sender = threading.Thread(target=outbox.run_forever, args=(stop,), daemon=True)
    sender.start()
    scp = AE(ae_title="PACS")
    scp.add_supported_context(SEG)
    scp.add_supported_context(Verification)
    stored: list[str] = []
    server = None
    try:
        wait_for(lambda: len(probes) >= 2, 10, 0.1, "probes while it is down")
        time.sleep(0.5)
        with db.session() as s:
            assert s.scalar(select(OutboxItem.attempts)) == 1  # probes are not deliveries
        server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda event: stored.append(event.request.AffectedSOPInstanceUID) or 0x0000)])
        back = time.monotonic()

        def sent():
            with db.session() as s:
                return s.scalar(select(OutboxItem.state)) == "sent"

        wait_for(sent, 10, 0.05, "the delivery after the destination's return")
        assert time.monotonic() - back < 2 + 2.0  # one interval and the round, not 30 s of poll or 300 s of backoff
        assert len(answered) == 1 and time.monotonic() - answered[0] < 1.5  # woken by the answer itself
        assert len(stored) == 1
        (d,) = deliveries.destination_summary(db, ["pacs"])
        assert d["up"] is True and d["failures"] == 0
        n = len(probes)
        for _ in range(3):
            outbox.run_once()
        time.sleep(1.0)
        assert len(probes) == n  # up: nothing probed
    finally:
        stop.set()
        outbox.wake()
        sender.join(5)
        assert not sender.is_alive()
        if server:
            server.shutdown()
        db.dispose()


def test_one_probe_in_flight_on_its_interval_and_none_once_closed():
    dest = Destination(name="pacs", probe_seconds=0.3)
    release, calls, answered = threading.Event(), [], []

    def check(d: Destination) -> str:
        calls.append(time.monotonic())
        release.wait(5)
        return ""

    prober = Prober(answered.append, check)
    assert prober.maybe_probe(dest)
    time.sleep(0.5)
    assert not prober.maybe_probe(dest) and prober.in_flight("pacs")  # the first still runs
    release.set()
    wait_for(lambda: answered == [dest], 5, 0.02, "the answer")
    assert prober.maybe_probe(dest)  # its interval is over
    wait_for(lambda: not prober.in_flight("pacs"), 5, 0.02, "the second probe")
    assert not prober.maybe_probe(dest) and 0 < prober.due_in(dest) <= 0.3  # within its interval
    prober.tried("pacs")  # a failed delivery counts as a look: the interval starts again
    assert prober.due_in(dest) > 0.25
    time.sleep(0.35)
    release.clear()
    assert prober.maybe_probe(dest)
    prober.close()  # stopping: the probe in flight reports nothing, and none starts
    release.set()
    wait_for(lambda: not prober.in_flight("pacs"), 5, 0.02, "the third probe")
    assert len(calls) == 3 and answered == [dest, dest]
    time.sleep(0.35)
    assert not prober.maybe_probe(dest)


# ------------------------------------------------------------------------------------- the probes themselves
def test_echo_probe_is_bounded_and_says_why():
    """A port nobody listens on, and one that accepts TCP but never answers the association request (the probe
    must not hold the sender or the stop); a real SCP answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    closed = free_port()
    refused = f"connection refused by 127.0.0.1:{closed}"
    assert echo_destination(Destination(port=closed), "SEGNODE", timeout=1.0) == refused
    ok, why = echo("127.0.0.1", closed, "PACS")  # dicom-node echo: was "association aborted"
    assert not ok and why == refused
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(4)
    try:
        t0 = time.monotonic()
        reason = echo_destination(Destination(port=mute.getsockname()[1]), "SEGNODE", timeout=1.0)
        assert reason and time.monotonic() - t0 < 5
    finally:
        mute.close()
    for offered in (Verification, SEG):  # an archive without Verification: its association alone proves it up
        scp = AE(ae_title="PACS")
        scp.add_supported_context(offered)
        port = free_port()
        server = scp.start_server(("127.0.0.1", port), block=False)
        try:
            assert echo_destination(Destination(ae_title="PACS", port=port), "SEGNODE") == ""
        finally:
            server.shutdown()
    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    scp.require_called_aet = True  # the node calls it by a title it does not have: rejected, not up
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        assert "rejected" in echo_destination(Destination(ae_title="OTHER", port=port), "SEGNODE")
    finally:
        server.shutdown()


def _http(status: int, delay: float = 0.0):
    seen: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_stow_probe_counts_any_answer_below_500():
    for status, up in ((200, True), (204, True), (401, True), (404, True), (503, False)):
        server, seen = _http(status)
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web/"
            reason = query_destination(Destination(name="web", protocol="stow", url=url), timeout=2.0)
            assert (reason == "") is up, (status, reason)
            assert seen == ["/dicom-web/studies?limit=1"]
        finally:
            server.shutdown()
    refused = Destination(name="web", protocol="stow", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    assert "could not connect" in query_destination(refused, timeout=1.0)
    server, _ = _http(200, delay=5.0)  # answers too late
    try:
        t0 = time.monotonic()
        slow = Destination(name="web", protocol="stow", url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web")
        assert query_destination(slow, timeout=1.0) and time.monotonic() - t0 < 4
    finally:
        server.shutdown()


def test_the_sender_stops_without_waiting_for_a_probe_in_flight(tmp_path):
    """The destination accepts TCP but never answers: its probe hangs until its timeout, and the sender's loop
    still ends at once (the node's stop is bounded; the probe thread reports nothing after it)."""
    from dicom_node.deliver.outbox import Outbox
    from storage import deliveries

    db, _ = _one_row(tmp_path, "pacs")
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(4)
    dest = Destination(name="pacs", ae_title="PACS", port=mute.getsockname()[1], retry_initial_seconds=300,
                       retry_max_seconds=300, probe_seconds=0.2)
    outbox = Outbox(Settings(destinations=[dest]), db, "host:1:sender")
    deliveries.destination_failed(db, "pacs", "connection refused", 300, 300)
    stop = threading.Event()
    sender = threading.Thread(target=outbox.run_forever, args=(stop,), daemon=True)
    sender.start()
    try:
        wait_for(lambda: outbox.prober.in_flight("pacs"), 10, 0.05, "a probe in flight")
        t0 = time.monotonic()
        stop.set()
        outbox.wake()
        sender.join(3)
        assert not sender.is_alive() and time.monotonic() - t0 < 3
        assert outbox.prober.in_flight("pacs")  # still waiting on the mute peer, alone, in its daemon thread
        assert not outbox.prober.maybe_probe(dest)
    finally:
        stop.set()
        mute.close()
        db.dispose()
