"""What the benchmarks run against and send: free ports, dcmtk's storescp and storescu, Orthanc, the node as its own
process, and the series they send (rendered phantoms, whole legs).

Why apart from the benchmarks: every benchmark (bench/run.py and the stage profiles) starts the same peers and
sends the same inputs, and reads them from here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
ENV_NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


# ------------------------------------------------------------------------------------------- inputs
def make_study(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """An n-slice axial MR series of size² (rendered phantom slabs, repeated with new positions/UIDs)."""
    from dataclasses import replace

    from inference.phantom import Geometry, Phantom, random_anatomy, render
    from inference.phantom_io import write_dicom_series

    rng = np.random.default_rng(seed)
    anat = random_anatomy(rng)
    ps = (2 * 170 * anat.scale + 60) / size
    slab = min(n, 40)
    thick = max(2.0, (anat.z_extent[0] - anat.z_extent[1]) / max(n, 1))
    g = Geometry(
        size,
        size,
        slab,
        (ps, ps),
        (-(size - 1) / 2 * ps, 15 * anat.scale - (size - 1) / 2 * ps, anat.z_knee + 150),
        slice_step=(0, 0, -thick * n / slab),
        slice_thickness=thick,
    )
    base = render(anat, g, seed=seed)
    reps = int(np.ceil(n / slab))
    image = np.concatenate([base.image] * reps)[:n]
    labels = np.concatenate([base.labels] * reps)[:n]
    geom = replace(g, n_slices=n, slice_step=(0, 0, -thick))
    return write_dicom_series(Phantom(anat, geom, image, labels), folder, seed=seed)


def whole_leg_study(folder: Path, size: int = 448, seed: int = 0, thickness: float | None = None) -> list[Path]:
    """A whole-leg axial MR series, iliac crest to below the ankle, both legs, size² (a rendered phantom, not a
    repeated slab: every slice is anatomy, so the quality gate passes it when the model is right). The slice
    thickness is chosen for about 158 slices at the anatomy's size, as the series this was measured on."""
    from inference.phantom import Geometry, random_anatomy, render
    from inference.phantom_io import write_dicom_series
    anat = random_anatomy(np.random.default_rng(seed))
    top, bottom = anat.z_extent
    thick = thickness or (top - bottom) / 158
    n = int((top - bottom) / thick)
    ps = (2 * 170 * anat.scale + 60) / size
    g = Geometry(size, size, n, (ps, ps), (-(size - 1) / 2 * ps, 15 * anat.scale - (size - 1) / 2 * ps, top),
                 slice_step=(0, 0, -thick), slice_thickness=thick)
    return write_dicom_series(render(anat, g, seed=seed), folder, seed=seed)


# ------------------------------------------------------------------------------------------- peers
class DcmtkSCP:
    def __init__(self, folder: Path, nodelay: bool = True, aet: str = "PACS"):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.folder = folder
        env = ENV_NODELAY if nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        self.proc = subprocess.Popen([STORESCP, "-aet", aet, "-od", str(folder), "+xa", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class OrthancProc:
    """Orthanc (Debian's package) from the shipped configuration, without auto-routing: the benchmark routes
    each series by REST when it wants (the call the shipped Lua script makes), with the node as ``segnode``."""

    BIN = "/usr/sbin/Orthanc"

    def __init__(self, folder: Path, node_port: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.dicom, self.http = free_port(), free_port()
        cfg = json.loads("\n".join(ln for ln in (ROOT / "deploy/orthanc/orthanc.json").read_text().splitlines()
                                   if not ln.strip().startswith("//")))
        cfg.update({"DicomPort": self.dicom, "HttpPort": self.http, "StorageDirectory": str(folder / "db"),
                    "IndexDirectory": str(folder / "db"), "LuaScripts": [], "Plugins": [],
                    "DicomModalities": {"segnode": ["SEGNODE", "127.0.0.1", node_port]},
                    "RemoteAccessAllowed": False, "AuthenticationEnabled": False})
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([self.BIN, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while True:
            try:
                self.api("/system")
                return
            except OSError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    def api(self, path: str, data: bytes | None = None):
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def route(self, series_uid: str) -> None:
        (sid,) = [x["ID"] for x in self.api("/tools/lookup", series_uid.encode()) if x["Type"] == "Series"]
        self.api("/modalities/segnode/store", sid.encode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


class NodeProc:
    def __init__(self, workdir: Path, fsync: bool, dest_port: int | None = None, stable: float = 1.0,
                 port: int | None = None, extra: str = "", root: Path = ROOT, policy: str = "send_flagged"):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.dir = workdir
        # send_flagged: the benchmark studies repeat one rendered slab down the series (a femur three times
        # over), which the quality gate rightly fails; the gate still runs in full, and the SEG still arrives
        dest = (f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nport = {dest_port}\nretries = 1\n'
                f'backoff_seconds = 0.5\nquality_policy = "{policy}"\n') if dest_port else ""
        (workdir / "node.toml").write_text(
            f'[node]\ndata_dir = "var"\nlog_level = "WARNING"\n[scp]\nbind_address = "127.0.0.1"\nport = {self.port}\n'
            f'fsync = {"true" if fsync else "false"}\nmin_free_disk_mb = 1\n'
            f'[series]\nstable_seconds = {stable}\nscan_interval_seconds = 0.2\n[worker]\npoll_seconds = 0.2\n'
            f'[web]\nenabled = false\n[[rules]]\nmin_slices = 2\n' + dest + extra)
        with open(workdir / "node.log", "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(workdir / "node.toml"),
                                          "serve"], cwd=root, env=ENV_NODELAY, stdout=log, stderr=subprocess.STDOUT)
        # Wait for the node's ready line, not just the open port: the port opens before the model has loaded,
        # and sending while torch loads would measure the model load, not ingest.
        deadline = time.time() + 180
        while "dicom-node listening" not in (workdir / "node.log").read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"node did not start: {(workdir / 'node.log').read_text()[-2000:]}")
            time.sleep(0.1)
        wait_port(self.port, 10)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def db(self):
        from storage.db import Database

        return Database(f"sqlite:///{self.dir / 'var' / 'node.db'}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def storescu(port: int, folders: list[Path], aet: str = "SEGNODE") -> float:
    """Send folders with dcmtk storescu (one process per folder, concurrently); wall seconds."""
    t = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", aet, "+sd", "127.0.0.1", str(port), str(f)], env=ENV_NODELAY,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t
