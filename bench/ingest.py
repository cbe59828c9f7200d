"""Ingest and sending: the node's C-STORE acceptor against dcmtk's storescp, and its sender against storescu,
side by side in one run."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.peers import DcmtkSCP, NodeProc, make_study, storescu


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
