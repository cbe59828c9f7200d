"""Benchmarks: ingest, sending, inference, SEG encoding, end-to-end latency and memory, each against a
reference measured side by side in the same run (dcmtk, or the FLOP floor from a measured matmul rate).

    .venv/bin/python bench/run.py                 # full run, prints a table, writes bench/results/<machine>-<date>.json
    .venv/bin/python bench/run.py --smoke         # tiny inputs (CI)
    .venv/bin/python bench/run.py --only inference,seg

Benchmarks are not tests: nothing here asserts a speed. BENCHMARKS.md keeps the latest tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


# ------------------------------------------------------------------------------------------- benchmarks
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), to compare receivers' work per image."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_ingest(work: Path, n: int, rounds: int) -> dict:
    """dcmtk storescp and the node both run for the whole step; each round sends a fresh study to one and
    then the other (the order alternating), so both see the machine in the same state. Judged on the median
    of the rounds' paired ratios; the receivers' CPU time per image is kept as a second, steadier reading
    (this machine's throughput drifts by 2x within minutes; CPU seconds per image drift much less)."""
    base = work / "ingest"
    studies = {}
    for senders in (1, 4):
        for r in range(rounds):
            one = base / f"study-{senders}-{r}"
            files = sorted(p for p in make_study(one, n, seed=1000 + 10 * r + senders))
            if senders == 1:
                studies[senders, r] = [one]
            else:
                parts = [base / f"study-{senders}-{r}-part{i}" for i in range(4)]
                for i, f in enumerate(files):
                    parts[i % 4].mkdir(parents=True, exist_ok=True)
                    shutil.move(str(f), parts[i % 4] / f.name)
                studies[senders, r] = parts
    out: dict = {"images": n, "rounds": rounds}
    for fsync in (False, True):
        dcmtk = DcmtkSCP(base / f"dcmtk-{fsync}")
        node = NodeProc(base / f"node-{fsync}", fsync=fsync, stable=3600)
        try:
            for senders in (1, 4):
                runs: dict[str, list[tuple[float, float]]] = {"dcmtk": [], "node": []}
                for r in range(rounds):
                    order = [("dcmtk", dcmtk), ("node", node)]
                    for name, rx in (order if r % 2 == 0 else order[::-1]):
                        c0 = cpu_seconds(rx.proc.pid)
                        secs = storescu(rx.port, studies[senders, r], "PACS" if name == "dcmtk" else "SEGNODE")
                        runs[name].append((secs, cpu_seconds(rx.proc.pid) - c0))
                    shutil.rmtree(dcmtk.folder, ignore_errors=True)  # keep the disk from filling; not timed
                    dcmtk.folder.mkdir()
                paired = sorted(d[0] / m[0] for d, m in zip(runs["dcmtk"], runs["node"]))
                med = {k: float(np.median([t for t, _ in v])) for k, v in runs.items()}
                cpu_ms = {k: float(np.median([c for _, c in v])) * 1e3 / n for k, v in runs.items()}
                out[f"{'fsync' if fsync else 'nofsync'}_{senders}sender"] = {
                    "dcmtk_img_s": n / med["dcmtk"], "node_img_s": n / med["node"],
                    "ratio": float(np.median(paired)), "round_ratios": paired,
                    "dcmtk_cpu_ms_per_image": cpu_ms["dcmtk"], "node_cpu_ms_per_image": cpu_ms["node"]}
        finally:
            node.stop()
            dcmtk.stop()
    return out


def bench_send(work: Path, n: int) -> dict:
    from dicom_node.deliver.dimse import send_items

    study = work / "send" / "s"
    make_study(study, n, seed=5)
    files = [str(p) for p in sorted(study.iterdir())]
    out = {"images": n}
    for nodelay in (True, False):
        scp = DcmtkSCP(work / "send" / f"rx{nodelay}", nodelay=nodelay)
        try:
            t = time.perf_counter()
            res = send_items("127.0.0.1", scp.port, "PACS", files)
            dt_ = time.perf_counter() - t
            assert res.ok, res.failed[:3]
        finally:
            scp.stop()
        out[f"receiver_nodelay_{nodelay}"] = {"img_s": n / dt_, "seconds": dt_}
    return out


def timed(device, fn, reps: int, warmup: int = 2) -> float:
    """Seconds for ``reps`` calls of ``fn`` after ``warmup`` calls, waiting for the GPU at both ends."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def matmul_gflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 * reps / timed(device, lambda: a @ b, reps) / 1e9


def conv_gflops(device, dtype, smoke: bool = False, reps: int = 5) -> float:
    """Throughput of one large 3x3 convolution (256 -> 256 channels, 64², batch 8), channels_last.

    A second reference beside the matrix multiply: on some CPUs torch's float32 matmul goes through a BLAS
    that does not use the widest vector units (MKL on AMD), while convolutions go through oneDNN, so a
    matmul-only floor would flatter the network. The floor uses the faster of the two.
    """
    import torch

    c, hw, b = (64, 32, 2) if smoke else (256, 64, 8)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(b, c, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        sec = timed(device, lambda: conv(x), reps)
    return 2 * c * c * 9 * hw * hw * b * reps / sec / 1e9


def bench_inference(n_slices: int, smoke: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from inference.model import (
        BUNDLED_MODEL,
        load_model,
        native_bf16_cpu,
        pick_precision,
    )

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out = {}
    for dev in devices:
        net, card = load_model(BUNDLED_MODEL, dev)
        net = net.to(memory_format=torch.contiguous_format)
        x1 = torch.rand(1, 3, card.input_size, card.input_size, device=dev)
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            net(x1)
        flops = fc.get_total_flops()
        variants = [("fp32", torch.float32, False, False)] + ([("fp32 channels_last", torch.float32, True, False)])
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            variants += [("bf16 channels_last", torch.bfloat16, True, False),
                         ("fp16 channels_last", torch.float16, True, False)]
        elif native_bf16_cpu():
            variants.append(("bf16 channels_last", torch.bfloat16, True, False))
        node_dtype = pick_precision("auto", dev)  # what the node runs on this machine by default
        res_node = {"node_precision": str(node_dtype).split(".")[-1]}
        if not smoke:  # torch.compile (inductor): minutes to compile, so not in the smoke run
            tag = "bf16" if node_dtype == torch.bfloat16 else "fp32"
            variants.append((f"{tag} channels_last torch.compile", node_dtype, True, True))
        batches = [16] if smoke else ([1, 8, 16, 32] if dev.type == "cpu" else [16, 64, 128])
        res = {"gflop_per_slice": flops / 1e9, "variants": [], **res_node}
        peak = {}
        for name, dtype, cl, compiled in variants:
            if dtype not in peak:
                mm = matmul_gflops(dev, dtype, 1024 if smoke else 2048)
                cv = conv_gflops(dev, dtype, smoke)
                res.setdefault("reference_gflops", {})[str(dtype).split(".")[-1]] = {"matmul": mm, "conv3x3": cv}
                peak[dtype] = max(mm, cv)
            m = net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            if compiled:
                try:
                    m = torch.compile(m)
                except Exception as exc:  # no compiler toolchain, unsupported platform: say so, go on
                    res.setdefault("notes", []).append(f"torch.compile unavailable: {exc}")
                    continue
            for bs in batches if not compiled else [b for b in batches if b in (8, 16, 64)]:
                x = torch.rand(bs, 3, card.input_size, card.input_size, device=dev)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                iters = max(1, n_slices // bs)
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                    tc = time.perf_counter()
                    try:
                        m(x)  # warm-up (and, for torch.compile, the compilation)
                    except Exception as exc:
                        res.setdefault("notes", []).append(
                            f"{name} batch {bs} failed: {type(exc).__name__}: {exc}"[:300]
                        )
                        continue
                    if compiled:
                        res.setdefault("compile_s", {})[str(bs)] = time.perf_counter() - tc
                    sec = timed(dev, lambda: m(x), iters, warmup=1)  # noqa: B023  # called here, in this iteration
                sps = bs * iters / sec
                floor_sps = peak[dtype] * 1e9 / flops
                res["variants"].append({"variant": name, "batch": bs, "slices_s": sps, "reference_gflops": peak[dtype],
                                        "floor_slices_s": floor_sps, "fraction_of_floor": sps / floor_sps})
        if dev.type == "cuda":
            res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 1e6
        out[dev.type] = res
    return out


def bench_seg(sizes: list[int]) -> dict:
    from dataclasses import replace

    import pydicom

    from dicom_node.encode.seg_writer import build_seg
    from dicom_node.infer.segments import split_sides
    from inference.model_card import ModelCard
    from inference.phantom import Anatomy, Geometry, Phantom
    from inference.phantom_io import write_dicom_series

    out = {}
    for n in sizes:
        tmp = Path(tempfile.mkdtemp())
        g = Geometry(256, 256, n, (1.5, 1.5), (-190, -190, 0), slice_step=(0, 0, -1.0), slice_thickness=1.0)
        img = np.zeros((n, 256, 256), np.uint16)
        lab = np.zeros((n, 256, 256), np.uint8)
        yy, xx = np.mgrid[:256, :256]
        for v, cx in ((1, 80), (2, 170), (3, 200), (4, 128)):
            lab[:, (yy - 128) ** 2 + (xx - cx) ** 2 < 100 + 40 * v] = v
        write_dicom_series(Phantom(Anatomy(), replace(g), img, lab), tmp)
        src = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(tmp.iterdir())]
        origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in src])
        t = time.perf_counter()
        card = ModelCard(version="bench")
        seg_labels, segments = split_sides(lab, card.labels, origins, (1, 0, 0), (0, 1, 0), (1.5, 1.5))
        seg = build_seg(
            src, seg_labels, segments, card, series_description="bench", series_number=1, manufacturer="bench"
        )
        enc = time.perf_counter() - t
        p = tmp / "seg.dcm"
        t = time.perf_counter()
        seg.save_as(p, enforce_file_format=True)
        out[str(n)] = {
            "build_s": enc,
            "segments": len(segments),
            "write_s": time.perf_counter() - t,
            "size_mb": p.stat().st_size / 1e6,
            "frames": int(seg.NumberOfFrames),
        }
        shutil.rmtree(tmp)
    return out


def seg_waiter(pacs):
    """``wait(k)``: block until the PACS folder holds ``k`` SEGs (storescp names them SG...), return the time."""
    def wait(k: int, timeout: float = 600) -> float:
        end = time.monotonic() + timeout
        while sum(1 for p in pacs.folder.iterdir() if p.name.startswith("SG")) < k:
            if time.monotonic() > end:
                raise RuntimeError("SEG never arrived")
            time.sleep(0.02)
        return time.perf_counter()
    return wait


def bench_end_to_end(work: Path, n_studies: int, n_slices: int, concurrent: int) -> dict:
    """Last instance sent → SEG received at a storescp, minus the configured stable wait."""
    import json as _json

    from sqlalchemy import select

    from storage.models import Job

    stable = 1.0
    pacs = DcmtkSCP(work / "e2e" / "pacs")
    node = NodeProc(work / "e2e" / "node", fsync=True, dest_port=pacs.port, stable=stable)
    studies = []
    for i in range(n_studies + concurrent):
        d = work / "e2e" / f"study{i}"
        make_study(d, n_slices, seed=100 + i)
        studies.append(d)

    wait_segs = seg_waiter(pacs)

    lat = []
    try:
        storescu(node.port, [studies[0]])  # warm-up (model already loaded by serve)
        wait_segs(1)
        for i in range(1, n_studies):
            storescu(node.port, [studies[i]])
            t_last = time.perf_counter()
            lat.append(wait_segs(i + 1) - t_last - stable)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=storescu, args=(node.port, [s])) for s in studies[n_studies:]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_sent = time.perf_counter()
        burst = wait_segs(n_studies + concurrent) - t_sent - stable
        db = node.db()
        with db.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.state == "done")))
            stages = [_json.loads(j.timings) for j in jobs]
        db.dispose()
        peak = node.peak_rss_mb()
    finally:
        node.stop()
        pacs.stop()
    mean_stage = {k: statistics.mean(s[k] for s in stages if k in s) for k in stages[0]} if stages else {}
    # the model's own time: its pass, and the quality gate's test-time-augmented pass (quality.tta)
    predict = mean_stage.get("predict", 0.0) + mean_stage.get("tta", 0.0)
    p = np.percentile(lat, [50, 95]) if lat else [float("nan")] * 2
    return {
        "studies": n_studies - 1,
        "slices": n_slices,
        "stable_seconds": stable,
        "latency_p50_s": float(p[0]),
        "latency_p95_s": float(p[1]),
        "overhead_beyond_predict_p50_s": float(p[0]) - predict,
        "mean_stage_s": mean_stage,
        f"burst_{concurrent}_studies_s": burst,
        "node_peak_rss_mb": peak,
        "wall_since_burst_s": time.perf_counter() - t0,
    }


NETWORK_STAGES = ("predict", "tta")
AROUND_STAGES = ("postprocess", "quality", "encode")


def bench_stage_times(work: Path, trees: dict[str, Path], rounds: int, size: int = 448,
                      n_slices: int | None = None) -> dict:
    """A whole-leg series through nodes running different code trees (e.g. main's and this one), one job at a
    time, the trees alternating within each round so that both see the machine in the same state; per job
    the job's own stage times (``jobs.timings``) and the wall time from the last instance sent to the
    encoded result (minus the stable wait: what the stage times leave out shows there). Every node runs the
    shipped defaults of everything that matters here (quality gate with its second pass, bf16 where the CPU
    has it, batch 16); each first gets a small warm-up series, so no job pays one-time loading."""
    import json as _json

    from sqlalchemy import select

    from inference.phantom import Geometry, random_anatomy, render, small_series
    from inference.phantom_io import write_dicom_series
    from storage.models import Job, Series

    anat = random_anatomy(np.random.default_rng(7))
    top, bottom = anat.z_extent
    thick = (top - bottom) / (n_slices or 158)
    ps = (2 * 170 * anat.scale + 60) / size
    geom = Geometry(size, size, int((top - bottom) / thick), (ps, ps),
                    (-(size - 1) / 2 * ps, 15 * anat.scale - (size - 1) / 2 * ps, top),
                    slice_step=(0, 0, -thick), slice_thickness=thick)
    leg = render(anat, geom, seed=7)
    warm = small_series(seed=3, n_slices=24, size=size)
    stable = 1.0
    nodes = {}
    try:
        for name, root in trees.items():
            pacs = DcmtkSCP(work / "stages" / name / "pacs")
            node = NodeProc(work / "stages" / name / "node", fsync=True, dest_port=pacs.port, stable=stable,
                            root=root, policy="hold")
            nodes[name] = (node, pacs)

        def run_one(name: str, ph, tag: str) -> dict:
            node, _ = nodes[name]
            folder = work / "stages" / name / tag
            uid = pydicom_series_uid(write_dicom_series(ph, folder, seed=len(tag)))
            storescu(node.port, [folder])
            t_sent = time.perf_counter()
            db = node.db()
            try:
                while True:
                    with db.session() as s:
                        job = s.scalars(select(Job).join(Series, Job.series_id == Series.id)
                                        .where(Series.series_uid == uid)).first()
                        timings = _json.loads(job.timings or "{}") if job is not None else {}
                        state = job.state if job is not None else ""
                    if "encode" in timings or state in ("failed", "skipped"):
                        break
                    if time.perf_counter() - t_sent > 1800:
                        raise RuntimeError(f"{name}: job for {tag} never finished")
                    time.sleep(0.1)
            finally:
                db.dispose()
            wall = time.perf_counter() - t_sent - stable
            shutil.rmtree(folder, ignore_errors=True)
            return {"timings": timings, "state": state, "wall_s": wall}

        for name in trees:
            run_one(name, warm, "warmup")
        jobs: dict[str, list] = {name: [] for name in trees}
        order = list(trees)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                jobs[name].append(run_one(name, leg, f"leg{r}"))
                print(f"stage_times: {name} round {r}: {jobs[name][-1]}", flush=True)
    finally:
        for node, pacs in nodes.values():
            node.stop()
            pacs.stop()
    out: dict = {"slices": geom.n_slices, "size": size, "rounds": rounds,
                 "trees": {k: str(v) for k, v in trees.items()}}
    for name, runs in jobs.items():
        stages = sorted({k for j in runs for k in j["timings"]})
        mean = {k: statistics.mean(j["timings"].get(k, 0.0) for j in runs) for k in stages}
        net = sum(mean.get(k, 0.0) for k in NETWORK_STAGES)
        around = sum(mean.get(k, 0.0) for k in AROUND_STAGES)
        out[name] = {"jobs": runs, "mean_stage_s": mean, "network_s": net, "around_s": around,
                     "ratio": around / net if net else float("nan"),
                     "ratios": [sum(j["timings"].get(k, 0.0) for k in AROUND_STAGES)
                                / max(sum(j["timings"].get(k, 0.0) for k in NETWORK_STAGES), 1e-9) for j in runs],
                     "wall_s": statistics.mean(j["wall_s"] for j in runs)}
    return out


def pydicom_series_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def bench_end_to_end_source(work: Path, n_studies: int, n_slices: int, stable: float = 60.0) -> dict:
    """With a queryable source: Orthanc routes each series to the node, which asks it how many instances the
    series has (C-FIND) and starts once it holds them all. Last instance routed → SEG at a storescp, with a
    60 s quiet timer that must not be what ends the wait (nothing is subtracted)."""
    import json as _json

    import pydicom
    from sqlalchemy import func, select

    from storage.models import Event, Instance, Job

    if not Path(OrthancProc.BIN).exists():
        return {"skipped": "Orthanc not installed (Debian's orthanc)"}
    base = work / "e2e-source"
    pacs = DcmtkSCP(base / "pacs")
    node_port = free_port()
    orthanc = OrthancProc(base / "orthanc", node_port)
    src = (f'[[sources]]\nname = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom}\n')
    node = None
    studies = []
    for i in range(n_studies):
        d = base / f"study{i}"
        paths = make_study(d, n_slices, seed=300 + i)
        studies.append((d, pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID))

    wait_segs = seg_waiter(pacs)

    lat = []
    try:
        node = NodeProc(base / "node", fsync=True, dest_port=pacs.port, stable=stable, port=node_port, extra=src)
        for d, _ in studies:
            r = subprocess.run([STORESCU, "-aec", "ORTHANC", "+sd", "127.0.0.1", str(orthanc.dicom), str(d)],
                               env=ENV_NODELAY, capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"storescu to Orthanc failed: {r.stderr.decode()[-500:]}")
        for i, (_, uid) in enumerate(studies):
            orthanc.route(uid)  # returns once Orthanc has sent the whole series
            t_last = time.perf_counter()
            lat.append(wait_segs(i + 1) - t_last)
        db = node.db()
        with db.session() as s:
            stages = [_json.loads(j.timings) for j in s.scalars(select(Job).where(Job.state == "done")
                                                                 .order_by(Job.id))]
            stages = stages[1:] or stages  # the first study warms the model up, as for the latencies
            # what completion adds: last instance recorded → its job running (C-FIND, judging, dispatch)
            last = dict(s.execute(select(Instance.series_id, func.max(Instance.received_at))
                                  .group_by(Instance.series_id)).all())
            started = dict(s.execute(select(Event.series_id, func.min(Event.at)).where(Event.kind == "running")
                                     .group_by(Event.series_id)).all())
        db.dispose()
        waits = [(started[k] - last[k]).total_seconds() for k in sorted(started) if k in last]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        pacs.stop()
    mean_stage = {k: statistics.mean(s[k] for s in stages if k in s) for k in stages[0]} if stages else {}
    model = sum(mean_stage.get(k, 0.0) for k in ("load", "preprocess", "predict", "postprocess"))
    lat_w = lat[1:] or lat  # the first study also warms up the model
    job = sum(mean_stage.values())
    p = np.percentile(lat_w, [50, 95])
    w = np.percentile(waits[1:] or waits, [50, 95]) if waits else [float("nan")] * 2
    return {"studies": len(lat_w), "slices": n_slices, "stable_seconds": stable, "latency_p50_s": float(p[0]),
            "latency_p95_s": float(p[1]), "overhead_beyond_model_p50_s": float(p[0]) - model,
            "overhead_beyond_job_stages_p50_s": float(p[0]) - job, "completion_wait_p50_s": float(w[0]),
            "completion_wait_p95_s": float(w[1]), "mean_stage_s": mean_stage}


# ------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import highdicom
    import pydicom
    import pynetdicom
    import torch

    cpu = ""
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (StopIteration, OSError):
        pass
    dcmtk = subprocess.run([STORESCU, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__, "highdicom": highdicom.__version__,
            "dcmtk": dcmtk[0] if dcmtk else ""}


def table(res: dict) -> str:
    lines = [f"machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), GPU: {res['machine']['cuda']}, "
             f"torch {res['machine']['torch']}, {res['machine']['date']}", ""]
    if "ingest" in res:
        r = res["ingest"]
        lines += [
            f"Ingest, {r['images']} MR images 256² (dcmtk storescu, TCP_NODELAY=1), {r.get('rounds', 1)} paired rounds",
            "",
            "| setting | dcmtk storescp img/s | node img/s | node/dcmtk, median of paired rounds "
            "(range) | receiver CPU ms/image dcmtk / node | target ≥ 0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in r.items():
            if isinstance(v, dict):
                ok = "met" if v["ratio"] >= 0.5 else "MISSED"
                rr = v.get("round_ratios") or [v["ratio"]]
                lines.append(
                    f"| {k} | {v['dcmtk_img_s']:.0f} | {v['node_img_s']:.0f} | {v['ratio']:.2f} "
                    f"({min(rr):.2f}–{max(rr):.2f}) | {v['dcmtk_cpu_ms_per_image']:.2f} / "
                    f"{v['node_cpu_ms_per_image']:.2f} | {ok if k.startswith('nofsync') else 'n/a (fsync on)'} |"
                )
        lines.append("")
    if "send" in res:
        r = res["send"]
        lines += [f"Sending, node C-STORE SCU → dcmtk storescp, {r['images']} images", "",
                  "| receiver | img/s |", "|---|---|"]
        for k, v in r.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['img_s']:.0f} |")
        lines.append("")
    if "inference" in res:
        for dev, r in res["inference"].items():
            lines += [
                f"Inference on {dev}, {r['gflop_per_slice']:.1f} GFLOP per 256² slice; the node runs "
                f"{r.get('node_precision', 'float32')} channels_last here (inference.precision = auto); each "
                "variant's floor uses the faster of a matmul and a large 3×3 convolution timed in the same "
                "precision (reference GFLOP/s)",
                "",
                "| variant | batch | slices/s | reference GFLOP/s | floor slices/s | fraction of floor "
                "| target ≥ 0.6 (CPU) |",
                "|---|---|---|---|---|---|---|",
            ]
            for v in r["variants"]:
                tgt = ("met" if v["fraction_of_floor"] >= 0.6 else "MISSED") if dev == "cpu" else "-"
                lines.append(f"| {v['variant']} | {v['batch']} | {v['slices_s']:.1f} | {v['reference_gflops']:.0f} | "
                             f"{v['floor_slices_s']:.1f} | {v['fraction_of_floor']:.2f} | {tgt} |")
            lines.append("")
            for prec, ref in r.get("reference_gflops", {}).items():
                lines += [
                    f"reference {prec}: matmul {ref['matmul']:.0f} GFLOP/s, 3×3 conv {ref['conv3x3']:.0f} GFLOP/s",
                    "",
                ]
            if r.get("compile_s"):
                lines += ["torch.compile time (first call) s: " + ", ".join(
                    f"batch {b}: {t:.0f}" for b, t in r["compile_s"].items()), ""]
            for note in r.get("notes", []):
                lines += [f"note: {note}", ""]
    if "seg" in res:
        lines += [
            "SEG encoding (highdicom BINARY, 256², 4 segments)",
            "",
            "| slices | frames | build s | write s | size MB |",
            "|---|---|---|---|---|",
        ]
        for n, v in res["seg"].items():
            lines.append(f"| {n} | {v['frames']} | {v['build_s']:.2f} | {v['write_s']:.2f} | {v['size_mb']:.1f} |")
        lines.append("")
    if "end_to_end" in res:
        r = res["end_to_end"]
        st = ", ".join(f"{k} {v:.2f}" for k, v in r["mean_stage_s"].items())
        burst_key = next(k for k in r if k.startswith("burst_"))
        lines += [
            f"End to end, {r['slices']}-slice series, last instance sent → SEG at storescp, minus stable wait",
            "",
            "| p50 s | p95 s | overhead beyond predict (p50) s | target ≤ 2 s | " + burst_key + " | node peak RSS MB |",
            "|---|---|---|---|---|---|",
            f"| {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['overhead_beyond_predict_p50_s']:.2f} | "
            f"{'met' if r['overhead_beyond_predict_p50_s'] <= 2 else 'MISSED'} | {r[burst_key]:.2f} | "
            f"{r['node_peak_rss_mb']:.0f} |",
            "",
            f"mean stage seconds: {st}",
            "",
        ]
    if "stage_times" in res:
        r = res["stage_times"]
        names = [k for k in r["trees"]]
        shown = ("load", "preprocess") + NETWORK_STAGES + AROUND_STAGES + ("send",)
        lines += [f"Stage times through the node (defaults: gate on, second pass on), whole-leg series "
                  f"{r['slices']} slices of {r['size']}², mean of {r['rounds']} jobs per tree, trees alternating", "",
                  "| tree | " + " | ".join(shown) + " | around / network (per job) | target ≤ 0.25 | last image → "
                  "encoded, minus stable wait s |", "|---|" + "---|" * (len(shown) + 3)]
        for name in names:
            v = r[name]
            st = v["mean_stage_s"]
            per = ", ".join(f"{x:.2f}" for x in v["ratios"])
            lines.append(f"| {name} | " + " | ".join(f"{st[k]:.2f}" if k in st else "-" for k in shown)
                         + f" | {v['ratio']:.2f} ({per}) | {'met' if v['ratio'] <= 0.25 else 'MISSED'} | "
                         f"{v['wall_s']:.1f} |")
        lines.append("")
    if "end_to_end_source" in res:
        r = res["end_to_end_source"]
        if "skipped" in r:
            lines += [f"End to end with a queryable source: skipped ({r['skipped']})", ""]
        else:
            e = res.get("end_to_end", {})
            without = (f"{e['latency_p50_s'] + e.get('stable_seconds', 1.0):.2f}"
                       if "latency_p50_s" in e else "-")
            st = ", ".join(f"{k} {v:.2f}" for k, v in r["mean_stage_s"].items())
            lines += [f"End to end, {r['slices']}-slice series routed by Orthanc (a source the node asks by C-FIND), "
                      f"last instance routed → SEG at storescp, stable_seconds = {r['stable_seconds']:g}, nothing "
                      "subtracted; completion wait = last instance recorded → its job running", "",
                      "| p50 s | p95 s | completion wait p50 / p95 s | target ≤ 1 s | beyond the model (p50) s | "
                      "beyond all job stages (p50) s | without a source: p50 incl. the stable wait s |",
                      "|---|---|---|---|---|---|---|",
                      f"| {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['completion_wait_p50_s']:.2f} / "
                      f"{r['completion_wait_p95_s']:.2f} | {'met' if r['completion_wait_p95_s'] <= 1 else 'MISSED'} | "
                      f"{r['overhead_beyond_model_p50_s']:.2f} | {r['overhead_beyond_job_stages_p50_s']:.2f} | "
                      f"{without} |", "", f"mean stage seconds: {st}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny inputs, seconds not minutes (CI)")
    ap.add_argument("--only", default="ingest,send,inference,seg,end_to_end,end_to_end_source")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--reference-tree", type=Path, default=None,
                    help="stage_times: also run a node from this code tree (e.g. a checkout of main), side by side")
    ap.add_argument("--rounds", type=int, default=2, help="stage_times: whole-leg jobs per tree")
    args = ap.parse_args(argv)
    from dicom_node.receive.scp import quiet_pynetdicom

    quiet_pynetdicom()
    only = set(args.only.split(","))
    res: dict = {"machine": machine(), "smoke": args.smoke}
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{'smoke-' if args.smoke else ''}{res['machine']['host']}-{res['machine']['date'][:10]}.json"
    steps = {
        "ingest": lambda: bench_ingest(work, 20 if args.smoke else 600, 1 if args.smoke else 6),
        "send": lambda: bench_send(work, 10 if args.smoke else 600),
        "inference": lambda: bench_inference(16 if args.smoke else 96, args.smoke),
        "seg": lambda: bench_seg([4] if args.smoke else [120, 1000]),
        "end_to_end": lambda: bench_end_to_end(work, 2 if args.smoke else 11, 4 if args.smoke else 120,
                                               1 if args.smoke else 4),
        "stage_times": lambda: bench_stage_times(
            work, {**({"reference": args.reference_tree} if args.reference_tree else {}), "this tree": ROOT},
            1 if args.smoke else args.rounds, size=64 if args.smoke else 448, n_slices=24 if args.smoke else None),
        "end_to_end_source": lambda: bench_end_to_end_source(work, 2 if args.smoke else 6, 4 if args.smoke else 120),
    }
    try:
        for key, step in steps.items():
            if key in only:
                res[key] = step()
                (args.out / name).write_text(json.dumps(res, indent=1))  # keep what is done if a later step fails
                print(f"{key}: done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    print(f"results: {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
