"""Accuracy monitoring from the radiologists' corrections (learn/accuracy.py): the statistics on known numbers,
unchanged copies never counted as Dice, the accuracy-drop webhook (once per structure and model version until
it recovers), /metrics, and the Corrections page and its JSON API. Rows are inserted directly: how a
correction is recognised and scored is the intake's business (and its tests')."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import statistics
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_outbox import _Webhook

from dicom_node.config import load_settings
from dicom_node.learn.accuracy import (
    accuracy_summary,
    check_accuracy_drop,
    control_limits,
    quartiles,
    rolling_medians,
    structure_keys,
    structure_stats,
)
from dicom_node.service import open_storage
from dicom_node.watch.metrics import NodeCollector
from dicom_node.watch.web import WebServer, create_app
from storage.models import Correction, Event, Job, ModelVersion, Series, Study
from storage.states import CorrectionState, EventKind, ModelState

T0 = dt.datetime(2026, 1, 5, 8, 0)


class Node:
    """A node's settings and database, no listener: rows go in directly."""

    def __init__(self, tmp: Path, learning: str = "", more: str = ""):
        self.config = tmp / "node.toml"
        self.config.write_text(f'[node]\ndata_dir = "{tmp / "var"}"\n[learning]\n{learning}\n{more}\n')
        self.settings = load_settings(self.config, environ={})
        self.db, _ = open_storage(self.settings)
        self.n = 0
        with self.db.session() as s:
            study = Study(study_uid="1.2.826.0.1.3680043.8.498.10")
            s.add(study)
            s.flush()
            series = Series(series_uid="1.2.826.0.1.3680043.8.498.11", study_id=study.id, state="done")
            s.add(series)
            s.flush()
            self.series = series.id

    def job(self, version: str) -> int:
        with self.db.session() as s:
            job = Job(series_id=self.series, state="done", model_version=version)
            s.add(job)
            s.flush()
            return job.id

    def serve(self, version: str) -> None:
        with self.db.session() as s:
            for mv in s.query(ModelVersion).filter(ModelVersion.state == ModelState.SERVING):
                mv.state = ModelState.RETIRED
            s.add(ModelVersion(version=version, path="/x", sha256="0" * 64, state=ModelState.SERVING,
                               promoted_at=T0 + dt.timedelta(hours=self.n)))

    def correction(self, version: str, dice: dict[str, float] | None = None,
                   state: CorrectionState = CorrectionState.CORRECTED, reason: str = "",
                   metrics: str | None = None) -> int:
        """One correction row, received a minute after the previous one; ``dice`` per structure key."""
        self.n += 1
        dice = dice or {}
        m = metrics if metrics is not None else json.dumps(
            {k: {"dice": d, "volume_sent_cm3": 100.0, "volume_corrected_cm3": 100.0 * d, "volume_diff_cm3": 1.0}
             for k, d in dice.items()})
        with self.db.session() as s:
            c = Correction(sop_uid=f"1.2.826.0.1.3680043.8.498.2{self.n}", series_id=self.series, job_id=None,
                           model_version=version, state=state, reason=reason, creator="Dr^Fix", station="OHIF",
                           calling_ae="ORTHANC", received_at=T0 + dt.timedelta(minutes=self.n), metrics=m,
                           mean_dice=statistics.fmean(dice.values()) if dice else None)
            s.add(c)
            s.flush()
            return c.id

    def events(self, kind: str) -> list[dict]:
        with self.db.session() as s:
            return [json.loads(e.detail) for e in s.query(Event).filter(Event.kind == kind).order_by(Event.id)]


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path, learning="accuracy_window = 4\naccuracy_floor = 0.8")
    yield n
    n.db.dispose()


# ----------------------------------------------------------------------------------------------- statistics
def test_statistics_on_known_numbers():
    assert rolling_medians([0.9, 0.7, 0.8, 0.5, 0.6], 3) == [0.9, 0.8, 0.8, 0.7, 0.6]
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0) and quartiles([0.7]) == (0.7, 0.7)
    # baseline = the first window: mean 0.9, sample σ 0.1 → limits 0.7 and 1.1; the later values do not move it
    lim = control_limits([0.8, 0.9, 1.0, 0.2, 0.95], 3)
    assert lim is not None and lim.baseline == 3 and not lim.provisional
    assert (lim.mean, lim.sd, lim.lower, lim.upper) == pytest.approx((0.9, 0.1, 0.7, 1.1))
    assert control_limits([0.8, 0.9], 10) is None  # fewer than min(window, 3)
    assert control_limits([0.8, 0.9, 1.0], 10).provisional
    st = structure_stats("femur", [(i, d, "") for i, d in enumerate([0.8, 0.9, 1.0, 0.2, 0.95])], 3)
    assert (st.count, st.median, st.min, st.max) == (5, 0.9, 0.2, 1.0)
    assert (st.q1, st.q3, st.iqr) == pytest.approx((0.8, 0.95, 0.15))
    assert st.rolling_median == 0.95  # median of 1.0, 0.2, 0.95
    assert [(p.correction, p.outside) for p in st.outside] == [(3, "below")]
    assert structure_keys(["tibia", "femur_left", "x", "femur", "pelvis_right"]) == [
        "femur", "femur_left", "tibia", "pelvis_right"]


def test_summary_per_version_and_structure_and_unchanged_is_never_a_dice(node):
    node.job("0.3.0")  # the newest job's version serves while the registry has no serving row
    for d in (0.9, 0.8, 0.7):
        node.correction("0.2.0", {"femur": d, "femur_left": d, "tibia": 0.5})
    for d in (0.6, 0.8):
        node.correction("0.3.0", {"femur": d})
    # unchanged copies carry Dice 1.0 in their metrics (what was sent equals what came back): not measures
    for _ in range(5):
        node.correction("0.3.0", {"femur": 1.0}, state=CorrectionState.UNCHANGED)
    node.correction("0.3.0", state=CorrectionState.UNUSABLE, reason="no source series held")
    node.correction("0.3.0", {"femur": 0.1}, state=CorrectionState.DELETED, reason="deleted by admin")
    node.correction("0.3.0", metrics='{"femur": {"dice": NaN}, "tibia": {"dice": 7}, "x": 1}')  # hostile JSON

    s = accuracy_summary(node.settings, node.db)
    assert s["serving_version"] == "0.3.0" and [v["model_version"] for v in s["versions"]] == ["0.3.0", "0.2.0"]
    new, old = s["versions"]
    assert new["serving"] and not old["serving"]
    assert (new["corrected"], new["unchanged_unverified"], new["unusable"], new["deleted"]) == (3, 5, 1, 1)
    assert new["structures"]["femur"]["count"] == 2 and new["structures"]["femur"]["median"] == pytest.approx(0.7)
    assert set(new["structures"]) == {"femur"}  # the hostile row's values are left out, not trusted
    assert list(old["structures"]) == ["femur", "femur_left", "tibia"]
    assert old["structures"]["femur"]["median"] == pytest.approx(0.8)
    assert old["structures"]["femur"]["trend"] == pytest.approx([0.8, 0.85, 0.9])  # newest first
    assert old["structures"]["tibia"]["iqr"] == 0.0 and old["structures"]["tibia"]["count"] == 3
    assert s["states"] == {"corrected": 6, "unchanged": 5, "unusable": 1, "waiting": 0, "deleted": 1}


# ----------------------------------------------------------------------------------------- the drop webhook
def test_accuracy_drop_notifies_once_until_it_recovers(tmp_path):
    hook = _Webhook()
    node = Node(tmp_path, learning="accuracy_window = 3\naccuracy_floor = 0.8",
                more=f'[notifications]\nwebhooks = ["http://127.0.0.1:{hook.port}/hook"]\ntimeout_seconds = 2\n')
    try:
        node.serve("1.0.0")
        for d in (0.5, 0.5):  # below the floor, but fewer than min(window, 3) corrections: nothing yet
            node.correction("1.0.0", {"femur": d, "tibia": 0.95})
        assert check_accuracy_drop(node.settings, node.db) == []
        node.correction("1.0.0", {"femur": 0.5, "tibia": 0.95})
        node.correction("0.9.0", {"tibia": 0.1})  # an old version's bad tibia does not count
        node.correction("0.9.0", {"tibia": 0.1})
        node.correction("0.9.0", {"tibia": 0.1})
        (sent,) = check_accuracy_drop(node.settings, node.db)
        assert sent == {"structure": "femur", "model_version": "1.0.0", "rolling_median": 0.5, "floor": 0.8,
                        "count": 3, "window": 3}
        wait_for(lambda: len(hook.events) == 1, 20, 0.1, "the accuracy-drop webhook")
        (ev,) = hook.events
        assert ev["event"] == "accuracy-drop" and ev["structure"] == "femur" and ev["model_version"] == "1.0.0"
        assert ev["rolling_median"] == 0.5 and ev["floor"] == 0.8 and ev["count"] == 3
        assert set(ev) == {"event", "node", "at", "structure", "model_version", "rolling_median", "floor", "count",
                           "window"}  # no patient, study or series in it
        # still below: no second alert, however often it is checked or however many corrections come
        node.correction("1.0.0", {"femur": 0.6, "tibia": 0.95})
        assert check_accuracy_drop(node.settings, node.db) == []
        assert check_accuracy_drop(node.settings, node.db) == []
        # recovered: the rolling median of the newest three is back above the floor; recorded, not notified
        for _ in range(2):
            node.correction("1.0.0", {"femur": 0.95, "tibia": 0.95})
        assert check_accuracy_drop(node.settings, node.db) == []
        assert [e["structure"] for e in node.events(EventKind.ACCURACY_RECOVERED)] == ["femur"]
        # a new drop is a new alert
        for _ in range(2):
            node.correction("1.0.0", {"femur": 0.4, "tibia": 0.95})
        (again,) = check_accuracy_drop(node.settings, node.db)
        assert again["structure"] == "femur" and again["rolling_median"] == 0.4
        # a promoted model starts with no open drop of its own: its femur is measured from its own corrections
        node.serve("1.1.0")
        assert check_accuracy_drop(node.settings, node.db) == []
        wait_for(lambda: len(hook.events) == 2, 20, 0.1, "the second accuracy-drop webhook")
        assert [e["event"] for e in hook.events] == ["accuracy-drop"] * 2
        assert len(node.events(EventKind.ACCURACY_DROP)) == 2
        assert accuracy_summary(node.settings, node.db)["open_drops"] == [
            {"model_version": "1.0.0", "structure": "femur"}]
    finally:
        hook.stop()
        node.db.dispose()


# -------------------------------------------------------------------------------------------------- /metrics
def _samples(node: Node) -> dict[tuple, float]:
    reg = CollectorRegistry()
    reg.register(NodeCollector(node.settings, node.db, None))
    text = generate_latest(reg).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_lines(node):
    none = _samples(node)
    assert none[("dicomnode_corrections", (("state", "corrected"),))] == 0
    assert not [k for k in none if k[0] == "dicomnode_correction_dice_median"]
    node.serve("2.0.0")
    for d in (0.9, 0.7, 0.8):
        node.correction("2.0.0", {"pelvis": d})
    node.correction("1.0.0", {"pelvis": 0.6})
    node.correction("2.0.0", {"pelvis": 1.0}, state=CorrectionState.UNCHANGED)
    m = _samples(node)
    assert m[("dicomnode_corrections", (("state", "corrected"),))] == 4
    assert m[("dicomnode_corrections", (("state", "unchanged"),))] == 1
    assert m[("dicomnode_correction_dice_median", (("model_version", "2.0.0"), ("structure", "pelvis")))] == 0.8
    assert m[("dicomnode_correction_dice_median", (("model_version", "1.0.0"), ("structure", "pelvis")))] == 0.6
    assert m[("dicomnode_correction_dice_count", (("model_version", "2.0.0"), ("structure", "pelvis")))] == 3
    assert m[("dicomnode_correction_dice_rolling", (("structure", "pelvis"),))] == 0.8  # the serving version only
    assert m[("dicomnode_correction_dice_floor", ())] == 0.8
    assert m[("dicomnode_accuracy_drop", (("structure", "pelvis"),))] == 0


# ------------------------------------------------------------------------------------------ page and API
class Dashboard:
    def __init__(self, node: Node):
        self.port = free_port()
        self.server = WebServer(create_app(node.settings, node.db), "127.0.0.1", self.port)
        self.server.start()
        wait_for(self._up, 30, 0.1, "the dashboard to listen")

    def _up(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def get(self, path: str) -> tuple[int, dict, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()

    def stop(self) -> None:
        self.server.stop()


def test_corrections_page_and_api_with_rows_and_with_none(node):
    dash = Dashboard(node)
    try:
        status, headers, page = dash.get("/corrections")
        assert status == 200 and 'id="no-accuracy"' in page and "<svg" not in page and ">none<" in page
        assert "script-src" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        assert json.loads(dash.get("/api/corrections")[2]) == []
        assert json.loads(dash.get("/api/accuracy")[2])["versions"] == []
        assert 'href="corrections"' in dash.get("/")[2]  # the nav link on the dashboard

        node.serve("3.0.0")
        job = node.job("3.0.0")
        for d in (0.90, 0.92, 0.91, 0.93, 0.40):  # the last one far below the baseline's limits
            node.correction("3.0.0", {"femur": d, "femur_left": d, "tibia": 0.85})
        with node.db.session() as s:
            s.query(Correction).filter(Correction.id == 1).update({"job_id": job})
        node.correction("3.0.0", {"femur": 1.0}, state=CorrectionState.UNCHANGED)
        node.correction("3.0.0", state=CorrectionState.UNUSABLE, reason="no segment matched <b>Tissue</b>")

        rows = json.loads(dash.get("/api/corrections?limit=3")[2])
        assert [r["state"] for r in rows] == ["unusable", "unchanged", "corrected"]
        assert rows[0]["reason"].startswith("no segment matched") and rows[0]["dice"] == {}
        assert rows[2]["dice"] == {"femur": 0.4, "femur_left": 0.4, "tibia": 0.85}
        assert rows[2]["creator"] == "Dr^Fix" and rows[2]["calling_ae"] == "ORTHANC"
        acc = json.loads(dash.get("/api/accuracy")[2])
        (v,) = acc["versions"]
        assert v["corrected"] == 5 and v["unchanged_unverified"] == 1
        assert v["structures"]["femur"]["median"] == pytest.approx(0.91)
        assert [p["correction"] for p in v["structures"]["femur"]["points"] if p["outside"]] == [5]

        status, _, page = dash.get("/corrections")
        assert status == 200 and page.count('class="correction"') == 7
        assert f'href="jobs/{job}"' in page and "(unverified)" in page
        assert "&lt;b&gt;Tissue&lt;/b&gt;" in page  # a received string is escaped, never markup
        charts = re.findall(r'<figure class="control-chart" data-structure="(\w+)" data-outside="(\d+)"', page)
        assert charts == [("femur", "1"), ("tibia", "0")]  # one chart per bone; femur's last point outside
        assert page.count('class="point out"') == 1 and 'class="floor"' in page and 'class="limit"' in page
        assert '<tr class="structure-stats" data-structure="femur_left">' in page
        assert "<script src" not in page  # nothing fetched from elsewhere
        assert 'href="../corrections"' in dash.get(f"/jobs/{job}")[2]
    finally:
        dash.stop()
