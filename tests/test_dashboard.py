"""The admin view in a real browser (Debian's headless Chromium), its JSON API, /metrics and /healthz."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, write_series

TOKEN = "s3cret-token-for-tests"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(url: str, tmp, *args: str) -> str:
    if not shutil.os.path.exists(CHROMIUM):
        pytest.fail("chromium missing: install Debian's chromium (the README's test command does)")
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=3000", *args, url],
                       capture_output=True, text=True, timeout=120)
    return r.stdout


def get(url: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def busy_node(tmp_path_factory):
    """A node with one delivered job and one failed delivery (the PACS went away, and the node gave up on it
    after give_up_after_hours, here 5 s)."""
    tmp = tmp_path_factory.mktemp("dash")
    pacs = PacsSCP(tmp / "pacs")
    node = NodeProcess(tmp, pacs, worker="max_attempts = 1", web=f'token = "{TOKEN}"',
                       dest_extra="retry_initial_seconds = 1\nretry_max_seconds = 2\ngive_up_after_hours = 0.0014")
    try:
        _, ok = write_series(tmp / "ok", seed=41)
        assert storescu(node.port, tmp / "ok").returncode == 0
        done = node.wait_job(pydicom.dcmread(ok[0], stop_before_pixels=True).SeriesInstanceUID)
        assert done["state"] == "done"
        pacs.stop()
        _, bad = write_series(tmp / "bad", seed=42)
        assert storescu(node.port, tmp / "bad").returncode == 0
        failed = node.wait_job(pydicom.dcmread(bad[0], stop_before_pixels=True).SeriesInstanceUID)
        assert failed["state"] == "failed"
        yield node, done["job"], failed["job"], tmp
    finally:
        node.stop()
        pacs.stop()  # already stopped above; validates what it received


def test_dashboard_in_chromium_shows_queue_jobs_and_failures(busy_node):
    node, ok_job, bad_job, tmp = busy_node
    base = f"http://127.0.0.1:{node.web_port}"
    dom = chromium(f"{base}/?token={TOKEN}", tmp, "--dump-dom")
    assert 'id="state-done"' in dom and 'id="state-failed"' in dom
    assert f'href="jobs/{ok_job}"' in dom and f'href="jobs/{bad_job}"' in dom
    assert f'data-retry="{bad_job}"' in dom and "given up after" in dom and "connection refused" in dom
    assert 'id="destinations"' in dom and 'data-up="false"' in dom
    assert 'data-script="ran"' in dom  # the page's script ran under its Content-Security-Policy
    assert "<svg" in dom and "predict" in dom
    shot = tmp / "dashboard.png"
    chromium(f"{base}/?token={TOKEN}", tmp, f"--screenshot={shot}", "--window-size=1280,1800")
    assert shot.exists() and shot.stat().st_size > 20_000
    page = chromium(f"{base}/jobs/{ok_job}?token={TOKEN}", tmp, "--dump-dom")
    assert 'id="preview"' in page and "delivered" in page and "timeline" in page.lower()


def test_preview_api_metrics_health_and_token(busy_node):
    node, ok_job, bad_job, _ = busy_node
    base = f"http://127.0.0.1:{node.web_port}"
    assert get(f"{base}/", token=None)[0] == 401
    status, png = get(f"{base}/jobs/{ok_job}/preview.png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, body = get(f"{base}/api/jobs/{ok_job}")
    job = json.loads(body)
    assert (
        status == 200
        and job["state"] == "done"
        and [e["kind"] for e in job["timeline"]][:3] == ["received", "complete", "queued"]
    )
    status, body = get(f"{base}/metrics")
    assert status == 200 and b'dicomnode_jobs{state="done"} 1.0' in body and b"dicomnode_cstore_total" in body
    assert b"dicomnode_unrecorded_instances 0.0" in body  # every stored instance's row is committed
    assert b'dicomnode_destination_up{destination="pacs"} 0.0' in body
    status, body = get(f"{base}/healthz", token=None)
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["unrecorded_instances"] == 0
    status, body = get(f"{base}/api/jobs/{bad_job}/retry", method="POST")
    assert status == 200
    assert json.loads(get(f"{base}/api/jobs/{bad_job}")[1])["timeline"][-1]["kind"] in ("requeued", "retry", "failed")
    assert json.loads(get(f"{base}/api/jobs/{bad_job}")[1])["state"] in ("delivering", "failed")  # not computed again
