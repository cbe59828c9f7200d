"""Evaluating a checkpoint on labelled cases through the same path the node uses.

Per case and structure: Dice and volume error (cm³ and %) on the source voxel grid, after postprocessing,
so the figures describe what a radiologist would receive: by default the average of the plain and the
test-time-augmented pass, as the node sends it with ``quality.tta = true`` (its default); ``passes=1`` scores
the plain pass alone. Writes a Markdown table in the published format,
the same numbers as JSON, and a PNG of overlay slices per case for a quick visual check.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dataset import list_cases, load_case
from .postprocess import volumes_cm3
from .predict import Predictor


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int((a & b).sum()) / s


def overlay_png(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, colours: dict[int, tuple], path: Path,
                n: int = 6) -> None:
    """Rows of [image | prediction overlay | ground-truth overlay] for ``n`` slices spread over the bones."""
    fg = np.where((truth > 0).any(axis=(1, 2)) | (pred > 0).any(axis=(1, 2)))[0]
    picks = fg[np.linspace(0, len(fg) - 1, n).astype(int)] if len(fg) else np.linspace(0, len(image) - 1, n).astype(int)
    rows = []
    hi = float(np.percentile(image, 99.5)) or 1.0
    for k in picks:
        g = np.clip(image[k] / hi * 255, 0, 255).astype(np.uint8)
        grey = np.stack([g] * 3, -1).astype(np.float32)
        tiles = [grey]
        for lab in (pred[k], truth[k]):
            rgb = grey.copy()
            for v, c in colours.items():
                m = lab == v
                rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(c, np.float32)
            tiles.append(rgb)
        rows.append(np.concatenate(tiles, 1))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, 0).astype(np.uint8)).save(path)


def evaluate(model: Path, data: Path, out: Path, device: str = "auto", cases: list[str] | None = None,
             png: bool = True, precision: str = "auto", passes: int = 2) -> dict:
    predictor = Predictor(model, device=device, precision=precision)
    card = predictor.card
    names = {lab.value: lab.name for lab in card.labels}
    colours = {lab.value: lab.rgb for lab in card.labels}
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case_name in cases or list_cases(data):
        case = load_case(data, case_name, tuple(card.labels))
        t0 = time.perf_counter()
        pred = predictor.predict(case.image, case.row_dir, case.col_dir, tta=passes == 2,
                                 pixel_spacing=(case.spacing[1], case.spacing[0])).labels
        seconds = time.perf_counter() - t0
        vp = volumes_cm3(pred, names, case.voxel_mm3)
        vt = volumes_cm3(case.labels, names, case.voxel_mm3)
        row: dict[str, Any] = {
            "case": case_name, "slices": int(case.image.shape[0]), "matrix": list(case.image.shape[1:]),
            "spacing_mm": [round(v, 3) for v in case.spacing], "seconds": round(seconds, 2), "structures": {}}
        for v, name in names.items():
            d = dice(pred == v, case.labels == v)
            err = vp[name] - vt[name]
            row["structures"][name] = {
                "dice": d, "volume_cm3": vp[name], "true_volume_cm3": vt[name], "volume_error_cm3": err,
                "volume_error_pct": (100.0 * err / vt[name]) if vt[name] > 0 else float("nan"),
            }
        results.append(row)
        if png:
            overlay_png(case.image, pred, case.labels, colours, out / f"overlay_{case_name}.png")
    summary = summarise(results, list(names.values()))
    report = {"model": str(model), "model_version": card.version, "data": str(data), "passes": passes,
              "precision": str(predictor.dtype).split(".")[-1], "cases": results, "summary": summary}
    (out / "evaluation.json").write_text(json.dumps(report, indent=1))
    (out / "evaluation.md").write_text(markdown(report))
    return report


def summarise(results: list[dict], names: list[str]) -> dict:
    s = {}
    for name in names:
        d = np.array([r["structures"][name]["dice"] for r in results], float)
        e = np.array([r["structures"][name]["volume_error_cm3"] for r in results], float)
        p = np.array([r["structures"][name]["volume_error_pct"] for r in results], float)
        s[name] = {"dice_mean": float(np.nanmean(d)), "dice_sd": float(np.nanstd(d)),
                   "abs_volume_error_cm3": float(np.nanmean(np.abs(e))),
                   "abs_volume_error_pct": float(np.nanmean(np.abs(p))),
                   "n": int(np.sum(~np.isnan(d)))}
    s["mean"] = {"dice_mean": float(np.mean([s[n]["dice_mean"] for n in names])),
                 "abs_volume_error_cm3": float(np.mean([s[n]["abs_volume_error_cm3"] for n in names])),
                 "abs_volume_error_pct": float(np.mean([s[n]["abs_volume_error_pct"] for n in names]))}
    return s


def markdown(report: dict) -> str:
    s = report["summary"]
    names = [k for k in s if k != "mean"]
    lines = [f"Model `{Path(report['model']).name}` v{report['model_version']} on `{report['data']}` "
             f"({len(report['cases'])} cases, {report.get('precision', 'float32')}, "
             f"{'plain pass only' if report.get('passes', 1) == 1 else 'mean of the plain and the augmented pass'}"
             ")", "",
             "| structure | Dice (mean ± sd) | mean abs. volume error (cm³) | mean abs. volume error (%) |",
             "|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n.lower()} | {s[n]['dice_mean']:.3f} ± {s[n]['dice_sd']:.3f} | "
                     f"{s[n]['abs_volume_error_cm3']:.2f} | {s[n]['abs_volume_error_pct']:.1f} |")
    m = s["mean"]
    lines.append(f"| **mean** | **{m['dice_mean']:.3f}** | **{m['abs_volume_error_cm3']:.2f}** "
                 f"| **{m['abs_volume_error_pct']:.1f}** |")
    lines += ["", "| case | slices | matrix | " + " | ".join(f"{n.lower()} Dice" for n in names) + " | seconds |",
              "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in report["cases"]:
        lines.append(f"| {r['case']} | {r['slices']} | {r['matrix'][0]}×{r['matrix'][1]} | "
                     + " | ".join(f"{r['structures'][n]['dice']:.3f}" for n in names) + f" | {r['seconds']} |")
    return "\n".join(lines) + "\n"
