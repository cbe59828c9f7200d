"""PostgreSQL gone from under a running node and back (cut at TCP by a forwarder between them, as a restart or a
network fault does): C-STOREs during the outage get a failure status and nothing acknowledged is lost, the node
stays up, each periodic loop says once that it fails and once that it works again (it logged 418 tracebacks in
33 s before), the part of a series acknowledged before the refusals waits for the rest, and the series sent
again after the outage is segmented whole, as one job.

Also the unit: ``dicom_node/repeats.py`` on its own."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import pytest
from conftest import NodeProcess, free_port, storescu, wait_for, write_series
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dicom_node.repeats import Repeats

PG_URL = os.environ.get("TEST_DATABASE_URL", "")


def test_a_failing_loop_is_told_once_reminded_and_its_recovery_told(caplog):
    log = logging.getLogger("test.repeats")
    quiet = Repeats(log, "completion scan", remind_s=3600, settle_s=0.0)
    with caplog.at_level(logging.DEBUG, logger="test.repeats"):
        for _ in range(200):
            quiet.failed(ConnectionError("connection refused\n[SQL: INSERT ...]\n[parameters: ('Doe^Jane',)]"))
        quiet.failed(TimeoutError("pool timeout"))  # another reason: told at once
        quiet.ok()
        quiet.ok()  # told once
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["completion scan failed: ConnectionError: connection refused (told again every 60 min while "
                      "it lasts)",
                      "completion scan still failing (201 times in 0 s): TimeoutError: pool timeout"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "completion scan works again (201 failures in 0 s)"]
    assert all("Doe^Jane" not in r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info) == 201
    caplog.clear()
    flapping = Repeats(log, "dispatch", remind_s=3600, settle_s=3600)
    with caplog.at_level(logging.INFO, logger="test.repeats"):
        for _ in range(5):  # a round that touched no table succeeds in the middle of an outage: still one outage
            flapping.failed(OSError("down"))
            flapping.ok()
    assert [r.levelname for r in caplog.records] == ["ERROR"] and flapping.failures == 5
    caplog.clear()
    guard = Repeats(log, "watchdog", settle_s=0.0)  # as the loops use it: the block's Exception told, swallowed
    with caplog.at_level(logging.INFO, logger="test.repeats"):
        with guard:
            raise ConnectionError("refused")
        with guard:
            pass
        with pytest.raises(KeyboardInterrupt), guard:  # not an Exception: it ends the loop as before
            raise KeyboardInterrupt
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    caplog.clear()
    eager = Repeats(log, "sender round", remind_s=0.0)
    with caplog.at_level(logging.ERROR, logger="test.repeats"):
        for _ in range(3):
            eager.failed(OSError("down"))
    assert len(caplog.records) == 3  # the reminder is due at every failure when the interval is 0


class Forwarder:
    """A TCP forwarder that can be cut (listener and every open connection closed) and restored on its port."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = self._conns, []
        if srv is not None:  # shutdown wakes the thread blocked in accept(); close alone would leave it accepting
            try:
                srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            srv.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.skipif(not PG_URL, reason="TEST_DATABASE_URL not set (.ci/run sets it to the local PostgreSQL)")
def test_postgresql_gone_and_back_under_a_running_node(tmp_path):
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    real = make_url(PG_URL)
    fw = Forwarder(real.host or "127.0.0.1", real.port or 5432)
    url = real.set(host="127.0.0.1", port=fw.port).update_query_dict({"options": f"-csearch_path={schema}"})
    node = NodeProcess(tmp_path, None, database_url=url.render_as_string(hide_password=False),
                       extra='allowed_calling_aets = ["GOODSCU", "STORESCU"]')
    try:
        _, before = write_series(tmp_path / "before", seed=61, n_slices=24, size=96)
        _, during = write_series(tmp_path / "during", seed=62, n_slices=24, size=96)
        assert storescu(node.port, tmp_path / "before").returncode == 0
        first = node.wait_job(_series_uid(before[0]))
        assert first["state"] == "done", (first, node.jobs()[0])

        fw.cut()
        r = storescu(node.port, tmp_path / "during")  # refused (a failure status per image) once the rows fail
        time.sleep(6)  # every loop fails for a while: the scan, dispatch and sender each tick every 0.3–1 s
        assert node.proc.poll() is None, node.log.read_text()[-3000:]
        fw.restore()
        wait_for(lambda: "completion scan works again" in node.log.read_text(), 60, 0.5, "the scan to work again")
        # the part acknowledged before the refusals is recorded now, with the times it arrived: it must wait for
        # the rest (series.abort_grace_seconds), not be judged at once on its own (it was: skipped for its gaps)
        wait_for(lambda: "series that were arriving wait" in node.log.read_text(), 30, 0.3, "the series to wait")
        time.sleep(3)  # three times stable_seconds
        uid = _series_uid(during[0])
        assert not [j for j in node.jobs() if j["series_uid"] == uid], node.jobs()
        # the sender (a PACS) sends the series again; what was acknowledged before counts as already there
        assert storescu(node.port, tmp_path / "during").returncode == 0
        job = node.wait_job(uid)
        assert job["state"] == "done", job
        [only] = [j for j in node.jobs() if j["series_uid"] == uid]
        assert only["instances"] == 24, only
    finally:
        node.stop()
        fw.cut()
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
    log = node.log.read_text()
    assert r.returncode != 0, "C-STOREs while the database was gone should have been refused"
    assert "Traceback" not in log, log[-3000:]
    assert log.count("completion scan failed: ") == 1 and log.count("dispatch failed: ") <= 1, log[-3000:]
    assert 1 <= log.count("refusing C-STOREs with Out of Resources") <= 2, log[-3000:]  # once per 10 s
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert len(errors) <= 20, "\n".join(errors)


def _series_uid(path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
