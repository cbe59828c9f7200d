"""Issue 27's bar, run the way the steering team will run it, on this project's stand-in.

A node as installed (``dicom-node serve``, SQLite, its own data folder, dcmtk's storescp as the PACS) gets three
studies of a family the bundled model does badly on (``bench/corrections_family.py``: the real-shape stand-in on
a bounded grid) by storescu; held results are approved as a radiologist would before correcting them; a
corrected SEG per study, made from the truth as OHIF (two) and 3D Slicer (one) save them, goes back by storescu;
``dicom-node corrections --json`` must report each sent result's per-structure Dice within 0.02 of this module's
own scoring (the SEG read at the PACS with pydicom and numpy); ``dicom-node learn --promote --json`` must finish
within 10 minutes and promote; a fourth study must then reach femur, tibia and pelvis ≥ 0.85, fibula ≥ 0.70.
A table is printed and ``bench/results/corrections_loop-<time>.json`` written. Usage::

    TCP_NODELAY=1 python -m bench.corrections_loop [--shapes 21,22,23,24] [--keep DIR]

The step functions take any node with ``port``, ``config`` and ``db()`` and any PACS with ``files()`` (the
suite's ``NodeProcess``/``PacsSCP`` too), so ``tests/test_corrections_loop.py`` runs the same steps small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from bench.corrections_family import dice, make_study, ohif_seg, read_seg, slicer_seg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}
BAR = {"femur": 0.85, "tibia": 0.85, "fibula": 0.70, "pelvis": 0.85}
AGREEMENT = 0.02
LEARN_LIMIT_S = 600.0


@dataclass
class Study:
    name: str
    folder: Path
    paths: list[Path]
    source: Sequence[pydicom.Dataset]
    truth: np.ndarray
    series_uid: str
    study_uid: str
    job: dict = field(default_factory=dict)
    seg_path: Path | None = None
    sent_dice: dict = field(default_factory=dict)  # the delivered SEG against the truth (this module's scoring)
    correction: Path | None = None


# ------------------------------------------------------------------------------------------------ peers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pacs:
    """dcmtk's storescp writing every received file to ``folder``."""

    def __init__(self, folder: Path, aet: str = "PACS"):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.aet, self.port = folder, aet, _free_port()
        self.proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(folder), "+xa", str(self.port)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(0.3)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Node:
    """``dicom-node serve`` with a temporary node.toml as installed: SQLite, its data folder, the PACS."""

    def __init__(self, folder: Path, pacs: Pacs, more: str = ""):
        folder.mkdir(parents=True, exist_ok=True)
        self.dir, self.port = folder, _free_port()
        self.config = folder / "node.toml"
        self.config.write_text(
            f'[node]\ndata_dir = "{folder / "var"}"\n[scp]\nae_title = "SEGNODE"\nbind_address = "127.0.0.1"\n'
            f'port = {self.port}\n[series]\nstable_seconds = 2.0\n[web]\nport = {_free_port()}\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            + more)
        self.log = folder / "node.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(self.config), "serve"],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        wait_for(self._answers, 120, 0.5, "the node to answer C-ECHO")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return subprocess.run(["echoscu", "-aec", "SEGNODE", "127.0.0.1", str(self.port)], env=ENV,
                              capture_output=True).returncode == 0

    def db(self) -> Any:
        from storage.db import Database

        return Database(f"sqlite:///{self.dir / 'var' / 'node.db'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_for(pred: Any, timeout: float, interval: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def cli(node: Any, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dicom-node -c <the node's config> ARGS`` as an admin runs it."""
    return subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(node.config), *args], cwd=ROOT,
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def cli_json(node: Any, *args: str, timeout: float = 300) -> Any:
    r = cli(node, *args, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"dicom-node {' '.join(args)} exited {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")
    return json.loads(r.stdout)


def storescu(node: Any, *paths: Path, aet: str = "STORESCU") -> None:
    """dcmtk's storescu as a viewer or modality sends; ``-R`` proposes the SOP classes of the files it holds
    (its default list has no Segmentation Storage)."""
    r = subprocess.run(["storescu", "-aet", aet, "-aec", "SEGNODE", "+sd", "-R", "127.0.0.1", str(node.port),
                        *map(str, paths)], env=ENV, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-1500:]}")


# ------------------------------------------------------------------------------------------------ steps
def job_of(node: Any, series_uid: str) -> dict | None:
    """The newest job of the series as ``dicom-node jobs --json`` shows it, plus the model version it used."""
    from sqlalchemy import select

    from dicom_node.watch.admin import job_rows
    from storage.models import Job

    db = node.db()
    try:
        row = next((j for j in job_rows(db, 200) if j["series_uid"] == series_uid), None)
        if row is not None:
            with db.session() as s:
                row["model_version"] = s.scalar(select(Job.model_version).where(Job.id == row["job"]))
        return json.loads(json.dumps(row)) if row else None
    finally:
        db.dispose()


def send_study(node: Any, ph: Any, folder: Path, name: str, seed: int) -> Study:
    from inference.phantom_io import write_dicom_series
    paths = write_dicom_series(ph, folder, patient_id=name.upper()[:16], seed=seed)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    storescu(node, folder)
    return Study(name, folder, paths, source, ph.labels, str(source[0].SeriesInstanceUID),
                 str(source[0].StudyInstanceUID))


def seg_at_pacs(pacs: Any, series_uid: str, exclude: set[str] = frozenset()) -> Path | None:  # type: ignore[assignment]
    for p in pacs.files():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        refs = ds.get("ReferencedSeriesSequence") or []
        if ds.Modality == "SEG" and refs and refs[0].SeriesInstanceUID == series_uid \
                and str(ds.SOPInstanceUID) not in exclude:
            return p
    return None


def delivered(node: Any, pacs: Any, study: Study, timeout: float = 900, approve: bool = True) -> Study:
    """Wait for the study's result at the PACS; a result the gate holds is approved first (a radiologist who
    corrects a result has seen it). Scores the delivered SEG against the truth with this module's reader."""
    final = ("review", "done", "failed", "skipped")
    job = wait_for(lambda: (j := job_of(node, study.series_uid)) and j["state"] in final and j,
                   timeout, 1.0, f"the job of {study.name}")
    if job["state"] == "review" and approve:
        r = cli(node, "approve", str(job["job"]), "--reason", "corrections bar: a radiologist will correct it")
        if r.returncode != 0:
            raise RuntimeError(f"approve failed: {r.stderr[-1000:]}")
    elif job["state"] in ("failed", "skipped"):
        raise RuntimeError(f"{study.name}: job {job['state']}: {job['reason']}")
    study.job = wait_for(lambda: (j := job_of(node, study.series_uid)) and any(d["ok"] for d in j["deliveries"])
                         and j, timeout, 1.0, f"the delivery of {study.name}")
    study.seg_path = wait_for(lambda: seg_at_pacs(pacs, study.series_uid), 60, 0.5, f"{study.name}'s SEG at the PACS")
    full = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths]
    study.sent_dice = dice(read_seg(pydicom.dcmread(study.seg_path), full), study.truth)
    return study


def correct(study: Study, style: str, out: Path) -> Path:
    """The radiologist's correction (the truth) saved as ``style`` ("ohif" or "slicer") would save it."""
    if style == "ohif":
        ohif_seg(study.source, study.truth).save_as(out, enforce_file_format=True)
    else:
        node_seg = pydicom.dcmread(study.seg_path, stop_before_pixels=True) if study.seg_path else None
        desc = str(node_seg.get("SeriesDescription", "Segmentation")) if node_seg else "Segmentation"
        slicer_seg(study.paths, study.source, study.truth, out, series_description=desc)
    study.correction = out
    return out


def correction_rows(report: Any) -> list[dict]:
    """The rows of ``dicom-node corrections --json`` (a list, or a mapping holding one)."""
    if isinstance(report, dict):
        report = next((v for k, v in report.items() if k in ("corrections", "rows", "items")), [report])
    return [r for r in report if isinstance(r, dict)]


def row_of(rows: list[dict], study: Study) -> dict | None:
    """The correction row of ``study``: by job id, else by a UID the row carries (SEG or source series)."""
    sop = str(pydicom.dcmread(study.correction, stop_before_pixels=True).SOPInstanceUID) if study.correction else ""
    for r in rows:
        if r.get("job") == study.job.get("job") or r.get("job_id") == study.job.get("job"):
            return r
        if sop and sop in json.dumps(r) or study.series_uid in json.dumps(r):
            return r
    return None


def structure_dice(row: dict) -> dict[str, float | None]:
    """Per structure (both sides) Dice from a correction row's metrics (``{"femur": {"dice": ...}}``)."""
    metrics = row.get("metrics", row)
    if isinstance(metrics, str):
        metrics = json.loads(metrics)
    out: dict[str, float | None] = {}
    for name in BAR:
        m = metrics.get(name) if isinstance(metrics, dict) else None
        out[name] = m.get("dice") if isinstance(m, dict) else (m if isinstance(m, float) else None)
    return out


def agreement(node_dice: dict, ours: dict) -> float:
    """The largest |node - ours| over the structures either side scores (inf when one side lacks one)."""
    worst = 0.0
    for name in BAR:
        a, b = node_dice.get(name), ours.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return float("inf")
        worst = max(worst, abs(float(a) - float(b)))
    return worst


def wait_corrections(node: Any, studies: list[Study], timeout: float = 300) -> list[dict]:
    """``dicom-node corrections --json`` once it has a row for every study."""
    def ready() -> list[dict] | None:
        rows = correction_rows(cli_json(node, "corrections", "--json"))
        return rows if all(row_of(rows, s) for s in studies) else None

    return wait_for(ready, timeout, 3.0, "a correction row for every study")


def learn(node: Any, *extra: str, timeout: float = LEARN_LIMIT_S + 300) -> tuple[dict, float]:
    """``dicom-node learn --promote --json [EXTRA]`` and its wall time in seconds."""
    t = time.monotonic()
    report = cli_json(node, "learn", "--promote", "--json", *extra, timeout=timeout)
    return report, time.monotonic() - t


def serving_version(node: Any) -> str | None:
    """The serving version as ``dicom-node models --json`` lists it."""
    report = cli_json(node, "models", "--json")
    rows = (report.get("models") or report.get("versions") or []) if isinstance(report, dict) else report
    return next((str(r.get("version")) for r in rows if r.get("state") == "serving" or r.get("serving")), None)


def check_coverage(ph: Any, index: int, min_slices: int = 3) -> Any:
    """A study of the bar must show every structure on ``min_slices`` slices at least: a long leg cut at the knee
    by the bounded grid would score a fibula of a few voxels (shape 43: 9 voxels, Dice 0 for any model)."""
    from bench.corrections_family import STRUCTURES

    for name, v in STRUCTURES.items():
        n = int((ph.labels == v).any(axis=(1, 2)).sum())
        if n < min_slices:
            raise SystemExit(f"shape {index}: the bounded study shows the {name} on {n} slices (< {min_slices}); "
                             "pick a shorter leg (another shape) or more slices (--max-slices)")
    return ph


def fmt(d: dict) -> str:
    return " | ".join("–" if d.get(n) is None else f"{d[n]:.3f}" for n in BAR)


def run(a: argparse.Namespace) -> dict:
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="corrections-bar-"))
    shapes = [int(i) for i in a.shapes.split(",")]
    styles = ["ohif", "slicer", "ohif"]
    result: dict[str, Any] = {"family": "bench.standin_realshape on a bounded grid (bench/corrections_family.py)",
                              "shapes": shapes, "contrast": a.contrast, "bar": BAR, "agreement_limit": AGREEMENT,
                              "learn_limit_s": LEARN_LIMIT_S, "studies": [], "machine": os.uname().nodename,
                              "cpus": os.cpu_count()}
    pacs = Pacs(work / "pacs")
    node = Node(work / "node", pacs, a.node_toml_extra)
    t0 = time.monotonic()
    try:
        if a.baseline_only:  # the serving model on all four studies through the node, nothing corrected
            for k, i in enumerate(shapes):
                s = delivered(node, pacs, send_study(node, make_study(i, a.contrast, max_slices=a.max_slices),
                                                     work / f"study{k}", f"CB{i:04d}", seed=i))
                print(f"{s.name} sent by {s.job.get('model_version') or '?'}: {fmt(s.sent_dice)}", flush=True)
                result["studies"].append({"name": s.name, "slices": len(s.paths), "job": s.job.get("job"),
                                          "model_version": s.job.get("model_version"), "state": s.job.get("state"),
                                          "quality": s.job.get("quality"), "review": s.job.get("review"),
                                          "independent_dice": s.sent_dice})
            return result
        studies = []
        for k, i in enumerate(shapes[:3]):
            ph = check_coverage(make_study(i, a.contrast, max_slices=a.max_slices), i)
            studies.append(send_study(node, ph, work / f"study{k}", f"CB{i:04d}", seed=i))
        for s in studies:
            delivered(node, pacs, s)
            print(f"{s.name} sent by {s.job.get('model_version') or '?'}: {fmt(s.sent_dice)}", flush=True)
        for s, style in zip(studies, styles):
            storescu(node, correct(s, style, work / f"{s.name}-{style}.dcm"), aet="VIEWER")
        rows = wait_corrections(node, studies)
        for s, style in zip(studies, styles):
            row = row_of(rows, s) or {}
            node_d = structure_dice(row)
            result["studies"].append({"name": s.name, "style": style, "slices": len(s.paths),
                                      "job": s.job.get("job"), "model_version": s.job.get("model_version"),
                                      "state": row.get("state"), "node_dice": node_d, "independent_dice": s.sent_dice,
                                      "max_abs_diff": agreement(node_d, s.sent_dice)})
        before = serving_version(node)
        report, learn_s = learn(node)
        after = serving_version(node)
        result.update(learn_report=report, learn_s=round(learn_s, 1), serving_before=before, serving_after=after)
        print(f"learn --promote: {learn_s / 60:.1f} min, serving {before} -> {after}", flush=True)
        ph = check_coverage(make_study(shapes[3], a.contrast, max_slices=a.max_slices), shapes[3])
        fourth = delivered(node, pacs, send_study(node, ph, work / "study3", f"CB{shapes[3]:04d}", seed=shapes[3]))
        # the same family's first studies as v0.2.0 scored them, and the fourth as the promoted model scores it
        result["fourth"] = {"name": fourth.name, "slices": len(fourth.paths), "job": fourth.job.get("job"),
                            "model_version": fourth.job.get("model_version"), "state": fourth.job.get("state"),
                            "quality": fourth.job.get("quality"), "dice": fourth.sent_dice}
        if a.before:  # the bundled model on the fourth study, in this process as the node runs it (both passes)
            from inference.model import BUNDLED_MODEL
            from inference.predict import Predictor

            g = ph.geometry
            pred = Predictor(BUNDLED_MODEL, device="cpu").predict(ph.image, g.row_dir, g.col_dir, tta=True,
                                                                      pixel_spacing=g.pixel_spacing)
            result["fourth"]["bundled_dice_in_process"] = dice(pred.labels, ph.labels)
    finally:
        node.stop()
        pacs.stop()
        result["total_s"] = round(time.monotonic() - t0, 1)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.baseline_only:
        return result
    checks = {
        "agreement": all(s["max_abs_diff"] <= AGREEMENT for s in result["studies"]),
        "learn_within_limit": result.get("learn_s", 1e9) <= LEARN_LIMIT_S,
        "promoted": bool(result.get("serving_after")) and result.get("serving_after") != result.get("serving_before"),
        "fourth_on_promoted": result.get("fourth", {}).get("model_version") == result.get("serving_after"),
        "fourth_bar": all((result.get("fourth", {}).get("dice", {}).get(n) or 0) >= v for n, v in BAR.items()),
    }
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def table(result: dict) -> str:
    lines = ["| study | writer | model | scored by | " + " | ".join(BAR) + " |",
             "|---|---|---|---|" + "---|" * len(BAR)]
    for s in result["studies"]:
        lines.append(f"| {s['name']} | {s['style']} | {s['model_version']} | node | {fmt(s['node_dice'])} |")
        lines.append(f"| {s['name']} | | | independent | {fmt(s['independent_dice'])} |")
    if "fourth" in result:
        f = result["fourth"]
        if "bundled_dice_in_process" in f:
            lines.append(f"| {f['name']} (4th) | – | bundled | in process | {fmt(f['bundled_dice_in_process'])} |")
        lines.append(f"| {f['name']} (4th) | – | {f['model_version']} | independent | {fmt(f['dice'])} |")
    lines.append("| bar (4th) | | | | " + " | ".join(f"≥ {v:.2f}" for v in BAR.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.corrections_loop", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="21,22,23,24", help="four stand-in shape indices: three corrected, then the "
                   "fourth scored after learning (6 and up are held-out random draws)")
    p.add_argument("--contrast", default="t1", choices=("t1", "pd", "water", "t2", "fat"))
    p.add_argument("--max-slices", type=int, default=72)
    p.add_argument("--keep", help="work in this folder and keep it (node log, PACS files, corrections)")
    p.add_argument("--before", action="store_true", help="also score the bundled model on the fourth study, in "
                   "this process after the loop (its 'before'; the node no longer serves it by then)")
    p.add_argument("--baseline-only", action="store_true", help="send the four studies and score what the serving "
                   "model delivers; no corrections, no learning (the before column)")
    p.add_argument("--node-toml-extra", default="", help="more node.toml text (e.g. a [learning] section)")
    a = p.parse_args(argv)
    result = run(a)
    if a.baseline_only:
        for s in result["studies"]:
            print(f"| {s['name']} | {s['slices']} | {s['model_version']} | {s['quality']} | "
                  f"{fmt(s['independent_dice'])} |")
    else:
        print(table(result))
        print(json.dumps({"checks": result["checks"], "learn_s": result.get("learn_s"), "passed": result["passed"]}))
    kind = "baseline" if a.baseline_only else "loop"
    out = ROOT / "bench" / "results" / f"corrections_{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
