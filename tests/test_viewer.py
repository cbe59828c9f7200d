"""The node's results in the viewer radiologists use: OHIF 3.13 (its built dist/, pinned), on Orthanc's
DICOMweb, in headless Chromium.

A phantom series goes through the node, which stores SEG and SR into Orthanc by STOW-RS; OHIF opens the
study, loads the SEG (every segment listed, the overlay on the bone's voxels at a known slice, compared
pixel by pixel with the SEG read back from Orthanc), then opens the SR (the viewer stays up, no error
boundary, the volumes listed). OHIF and Orthanc's /dicom-web are served from one origin by a small proxy
(no CORS), forwarding the Host header, from which Orthanc builds its BulkDataURIs.

Slow-ish (about a minute: inference on CPU, SwiftShader WebGL). Screenshots are kept in test-artifacts/viewer.
Skipped, saying why, where node, Chromium or the npm packages (``./node.sh test`` installs them) are missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from conftest import (
    ENV,
    NodeProcess,
    check_results_valid,
    free_port,
    storescu,
    wait_for,
    write_series,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / "tests/viewer"
OHIF_DIST = VIEWER / "node_modules/@ohif/app/dist"
CHROMIUM = Path("/usr/bin/chromium")
ORTHANC = Path("/usr/sbin/Orthanc")
ARTIFACTS = ROOT / "test-artifacts/viewer"

APP_CONFIG = """window.config = {
  routerBasename: '/', extensions: [], modes: [], customizationService: {}, showStudyList: true,
  maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false,
  showLoadingIndicator: true, strictZSpacingForVolumeViewport: true, showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)', name: 'orthanc',
      wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      bulkDataURI: { enabled: true }, omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def _missing() -> str:
    if shutil.which("node") is None:
        return "node (Node.js) not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not installed (Debian's chromium)"
    if not ORTHANC.exists():
        return "Orthanc not installed"
    if not (OHIF_DIST / "index.html").exists() or not (VIEWER / "node_modules/puppeteer-core").exists():
        return "tests/viewer/node_modules missing: ./node.sh test installs the pinned OHIF and puppeteer-core"
    return ""


def _proxy(orthanc_port: int) -> tuple[ThreadingHTTPServer, int]:
    """OHIF's files and Orthanc's /dicom-web on one origin; unknown paths give index.html (OHIF's routes)."""
    dist = OHIF_DIST.resolve()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output readable
            pass

        def do_GET(self):
            if self.path.startswith("/dicom-web"):
                return self._forward()
            path = self.path.split("?", 1)[0]
            if path == "/app-config.js":
                return self._send(200, APP_CONFIG.encode(), "application/javascript")
            # a file of the pinned dist only (resolved inside it), else the single-page app
            target = (dist / path.lstrip("/")).resolve()
            if not target.is_relative_to(dist) or not target.is_file():
                target = dist / "index.html"
            ctype = {".js": "application/javascript", ".css": "text/css", ".html": "text/html",
                     ".wasm": "application/wasm", ".json": "application/json", ".svg": "image/svg+xml",
                     ".png": "image/png"}.get(target.suffix, "application/octet-stream")
            self._send(200, target.read_bytes(), ctype)

        def do_POST(self):
            self._forward()

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("connection", "content-length", "accept-encoding")
            }
            req = urllib.request.Request(f"http://127.0.0.1:{orthanc_port}{self.path}", data=body,
                                         headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    self._send(r.status, r.read(), r.headers.get("Content-Type", ""))
            except urllib.error.HTTPError as e:
                self._send(e.code, e.read(), e.headers.get("Content-Type", ""))

        def _send(self, status: int, data: bytes, ctype: str):
            self.send_response(status)
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _api(port: int, path: str, data: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viewer")
    http_port, dicom_port = free_port(), free_port()
    cfg = {"Name": "viewer-test", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
           "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": ["/usr/share/orthanc/plugins"],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"}}
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    with open(tmp / "orthanc.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(ORTHANC), str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            return _api(http_port, "/system")
        except Exception:
            return None

    wait_for(up, 60, 0.3, "Orthanc to start")
    yield SimpleNamespace(http=http_port, tmp=tmp)
    proc.terminate()
    proc.wait(20)


def _fetch_results(o, study_uid: str) -> dict[str, Path]:
    """The SEG and SR in Orthanc's copy of the study, as files."""
    (study,) = [x["ID"] for x in _api(o.http, "/tools/lookup", study_uid.encode()) if x["Type"] == "Study"]
    out = {}
    for se in _api(o.http, f"/studies/{study}/series"):
        modality = se["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR"):
            (inst,) = _api(o.http, f"/series/{se['ID']}/instances")
            path = o.tmp / f"{modality}.dcm"
            with urllib.request.urlopen(f"http://127.0.0.1:{o.http}/instances/{inst['ID']}/file", timeout=60) as r:
                path.write_bytes(r.read())
            out[modality] = path
    return out


def test_ohif_shows_the_seg_on_the_bone_and_opens_the_sr(orthanc, tmp_path):
    why = _missing()
    if why:
        pytest.skip(f"real-viewer test skipped: {why}")
    o = orthanc
    t0 = time.monotonic()
    # the node, delivering by STOW-RS to Orthanc (SEG and SR); the source series goes to Orthanc too
    stow = (f'[[destinations]]\nname = "orthanc"\nprotocol = "stow"\n'
            f'url = "http://127.0.0.1:{o.http}/dicom-web"\nsend_sr = true\n')
    node = NodeProcess(tmp_path, None, extra='allowed_calling_aets = ["GOODSCU", "STORESCU"]', more=stow)
    try:
        _, paths = write_series(tmp_path / "study", seed=61)
        for p in paths:
            _api(o.http, "/instances", p.read_bytes())
        assert storescu(node.port, *paths).returncode == 0
        src = pydicom.dcmread(paths[0], stop_before_pixels=True)
        job = node.wait_job(src.SeriesInstanceUID, timeout=300)
        assert job["state"] == "done", job
        files = wait_for(lambda: (f := _fetch_results(o, src.StudyInstanceUID)) and len(f) == 2 and f, 60, 1.0,
                         "SEG and SR in Orthanc")
    finally:
        node.stop()
    timings = {"node": time.monotonic() - t0}
    # dciodvfy and Pixelmed on what Orthanc holds, beside the browser run (mostly waiting on each other)
    validation = ThreadPoolExecutor(1).submit(check_results_valid, list(files.values()))
    seg = pydicom.dcmread(files["SEG"])
    sr = pydicom.dcmread(files["SR"])
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    # the slices to look at: few, together showing every segment (each pick shows most of those not yet shown)
    import highdicom as hd

    hseg = hd.seg.Segmentation.from_dataset(seg)
    referenced = [r.ReferencedSOPInstanceUID for r in hseg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    masks = {uid: hseg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], combine_segments=True,
                                                      skip_overlap_checks=True)[0] for uid in referenced}
    numbers, slices = {int(s.SegmentNumber) for s in seg.SegmentSequence}, []
    while numbers - {n for u in slices for n in np.unique(masks[u])}:
        left = numbers - {n for u in slices for n in np.unique(masks[u])}
        slices.append(
            max(masks, key=lambda u: (len(left & set(np.unique(masks[u]).tolist())), int((masks[u] > 0).sum())))
        )
    assert len(slices) <= 4
    server, port = _proxy(o.http)
    t1 = time.monotonic()
    out = tmp_path / "shots"
    out.mkdir()
    try:
        spec = {"base": f"http://127.0.0.1:{port}", "study": src.StudyInstanceUID, "slices": slices,
                "segments": labels, "out": str(out), "chromium": str(CHROMIUM)}
        r = subprocess.run(["node", str(VIEWER / "drive.js"), json.dumps(spec)], cwd=VIEWER, capture_output=True,
                           text=True, timeout=240, env=ENV)
    finally:
        server.shutdown()
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True)
        for f in out.iterdir():
            shutil.copy(f, ARTIFACTS / f.name)
    timings["browser"] = time.monotonic() - t1
    assert validation.result() == 2
    timings["validators (waited for)"] = time.monotonic() - t1 - timings["browser"]
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    (ARTIFACTS / "viewer.json").write_text(json.dumps({**got, "timings_s": timings}, indent=1))
    assert "failure" not in got, got["failure"] + "\nconsole:\n" + "\n".join(got["console"][-20:])
    # every segment listed
    assert all(label in got["segText"] for label in labels)
    # the overlay on the bone: coloured canvas pixels (the MR is grey) mapped back to image pixels fall on the
    # SEG's mask of each chosen slice, and the mask is coloured
    assert [v["shown"] for v in got["views"]] == slices
    for view, uid in zip(got["views"], slices):
        _check_overlay(out / view["png"], view, masks[uid] > 0)
    # the SR opened: the viewer is still there, no error boundary, the volumes listed
    assert "Something went wrong" not in got["srText"], got["srText"][-2000:]
    assert not [e for e in got["errors"] if "ReferencedSOPSequence" in e or "TypeError" in e], got["errors"]
    shown = re.findall(r"Volume: ([0-9.]+) cm3", got["srText"])
    assert shown, got["srText"][-2000:]
    volumes = {f"{float(item.MeasuredValueSequence[0].NumericValue):.2f}" for item in _num_items(sr)}
    assert set(shown) <= volumes, (shown, volumes)


def _num_items(ds) -> list:
    """Every NUM content item of an SR's tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM":
            found.append(item)
        found += _num_items(item)
    return found


def _check_overlay(png: Path, view: dict, mask: np.ndarray) -> None:
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 40
    coloured[:4, :] = coloured[-4:, :] = coloured[:, :4] = coloured[:, -4:] = False  # the active viewport's border
    o, c, r = (np.array(view[k]) for k in ("origin", "col", "row"))
    # canvas = o + col*(c-o) + row*(r-o), pixel centres; invert for every coloured canvas pixel
    m = np.stack([c - o, r - o], axis=1)
    ys, xs = np.nonzero(coloured)
    img = np.linalg.solve(m, (np.stack([xs + 0.5, ys + 0.5], axis=1) - o).T).T
    cols, rows = np.rint(img[:, 0]).astype(int), np.rint(img[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    from scipy import ndimage

    near = ndimage.binary_dilation(mask, iterations=1)  # the outline is drawn on the edge pixels
    on_bone = near[rows[inside], cols[inside]]
    assert coloured.sum() > 50, "no overlay drawn"
    assert inside.mean() > 0.99 and on_bone.mean() > 0.97, (inside.mean(), on_bone.mean())
    # and the overlay covers the bone: the mask's pixel centres, on the canvas, are coloured
    mr, mc = np.nonzero(mask)
    cx = np.rint(o[0] + mc * (c - o)[0] + mr * (r - o)[0]).astype(int)
    cy = np.rint(o[1] + mc * (c - o)[1] + mr * (r - o)[1]).astype(int)
    ok = (cy >= 0) & (cy < coloured.shape[0]) & (cx >= 0) & (cx < coloured.shape[1])
    assert coloured[cy[ok], cx[ok]].mean() > 0.9
