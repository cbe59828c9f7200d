"""Benchmarks: ingest, sending, inference, SEG encoding, end-to-end latency and memory, each against a
reference measured side by side in the same run (dcmtk, or the FLOP floor from a measured matmul rate).

    .venv/bin/python bench/run.py                 # full run, prints a table, writes bench/results/<machine>-<date>.json
    .venv/bin/python bench/run.py --smoke         # tiny inputs (CI)
    .venv/bin/python bench/run.py --only inference,seg

Benchmarks are not tests: nothing here asserts a speed. BENCHMARKS.md keeps the latest tables. This file runs
the steps and writes the report; the steps are in bench/ingest.py (C-STORE in and out), bench/compute.py
(network and SEG encoding), bench/end_to_end.py (through the node, and with Orthanc as the source), the peers
and inputs they share in bench/peers.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compute import bench_inference, bench_seg  # noqa: E402
from bench.end_to_end import (  # noqa: E402
    AROUND_STAGES,
    NETWORK_STAGES,
    bench_end_to_end,
    bench_end_to_end_source,
    bench_stage_times,
)
from bench.ingest import bench_ingest, bench_send  # noqa: E402
from bench.peers import STORESCU  # noqa: E402


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
