"""Measure the quality gate (dicom_node/gate/quality.py) and keep the numbers its thresholds come from.

For held-out phantoms (``make_case(seed, wide/harsh)``, seeds the demo model never saw) the bundled model
predicts with probabilities and the test-time-augmented pass, as the node does. Then:

* **as predicted**: the prediction as it is, classed by its own Dice against the truth: *good* (every
  structure ≥ 0.85) must pass (or warn) in at least 95 % of cases; *poor* (some structure < 0.7) must fail,
  like a damaged one; in between is reported;
* **damaged**: the same prediction with one structure removed, shifted 12 mm, swapped with another class,
  or halved (its lower half of slices removed), for each bone; and the model run on images unlike its
  training (contrast inverted, heavy Rician noise). Every damaged result with any structure's Dice < 0.7
  against the truth must fail the gate.

``--standin DIR`` adds every case of a labelled data folder, typically the real-shape stand-in written by
``bench/standin_realshape.py`` (children's bones from the shape model at held-out coefficients, its own
renderer): whole volumes read from their DICOM series as the node reads them; the issue-25 gate bar
(good results sent, poor ones held) measured on bones the training never drew. ``--cases 0 --standin DIR``
measures it alone; give ``--out`` and ``--details`` elsewhere so that docs/quality-thresholds.json stays the
bundled model's record.

``--foreign N`` adds N cases of the foreign family (``inference/synth/foreign.py``: anatomy and renderer
never used in training, whole 100-140-slice volumes), the nearest stand-in for another site's images.

Writes ``docs/quality-thresholds.json``, the summary the thresholds are judged by (kept in git, small; its
tables are in ``docs/quality-gate.md``), and, under ``--details`` (an ignored folder), ``rows.json`` (every
case, variant, Dice and metric) and ``cases.md`` (the summary tables and one line per result). Small enough
for a 2-core CPU:

    .venv/bin/python bench/quality_thresholds.py --cases 8 --seed 7000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.gate.quality import AREA_BOUNDS_CM2, THRESHOLDS, assess  # noqa: E402
from dicom_node.infer.segments import split_sides  # noqa: E402
from dicom_node.infer.volume import SeriesVolume  # noqa: E402
from inference.labels import DEFAULT_LABELS  # noqa: E402
from inference.model import BUNDLED_MODEL  # noqa: E402
from inference.model_card import read_card  # noqa: E402
from inference.phantom import make_case  # noqa: E402
from inference.predict import Predictor  # noqa: E402
from inference.synth import foreign  # noqa: E402

NAMES = {lab.value: lab.name for lab in DEFAULT_LABELS}
MIN_TRUE_VOXELS = 50  # a structure with fewer true voxels than this is not scored (a sliver at the edge)


def volume_of(ph) -> SeriesVolume:
    g = ph.geometry
    return SeriesVolume(ph.image.astype(np.float32), [], g.row_dir, g.col_dir, g.pixel_spacing,
                        float(np.linalg.norm(g.slice_step)), g.slice_origins())


def dices(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for v, name in NAMES.items():
        t = truth == v
        if t.sum() < MIN_TRUE_VOXELS:
            continue
        p = pred == v
        out[name] = round(2.0 * float((p & t).sum()) / float(p.sum() + t.sum()), 3)
    return out


def damages(labels: np.ndarray, spacing_mm: float):
    """(name, damaged label map) for each damage and each bone present."""
    shift = max(1, int(round(12.0 / spacing_mm)))
    present = [v for v in NAMES if (labels == v).sum() >= MIN_TRUE_VOXELS]
    for v in present:
        name = NAMES[v].lower()
        out = labels.copy()
        out[out == v] = 0
        yield f"{name} removed", out
        out = labels.copy()
        m = labels == v
        out[m] = 0
        moved = np.roll(m, shift, axis=2)
        out[moved] = v
        yield f"{name} shifted 12 mm", out
        out = labels.copy()
        ks = np.nonzero(m.reshape(m.shape[0], -1).any(1))[0]
        half = ks[len(ks) // 2:]
        sel = np.zeros(m.shape[0], bool)
        sel[half] = True
        out[m & sel[:, None, None]] = 0
        yield f"{name} halved", out
    for a, b in ((1, 2), (2, 3), (1, 4)):
        if a in present and b in present:
            out = labels.copy()
            out[labels == a], out[labels == b] = b, a
            yield f"{NAMES[a].lower()}/{NAMES[b].lower()} swapped", out


#: the judged model's pelvis definition (its card's ``pelvis_includes_sacrum``), set once in ``main``
SACRUM_IS_PELVIS = {"value": True}


def judge(vol, labels, probs, tta, use_model: bool = True, first=None) -> dict:
    seg, segments = split_sides(labels, list(DEFAULT_LABELS), vol.origins, vol.row_dir, vol.col_dir,
                                vol.pixel_spacing)
    rep = assess(vol, seg, segments, DEFAULT_LABELS, probs if use_model else None, tta if use_model else None,
                 first_labels=first if use_model else None, sacrum_is_pelvis=SACRUM_IS_PELVIS["value"])
    return {"verdict": rep.verdict, "summary": rep.summary(),
            "metrics": {s.structure: s.metrics for s in rep.structures}}


def corrupt(image: np.ndarray, how: str, seed: int) -> np.ndarray:
    img = image.astype(np.float32)
    if how == "inverted contrast":
        return img.max() - img
    rng = np.random.default_rng(seed)
    sigma = 0.35 * float(np.percentile(img, 99))
    return np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)


def predict_case(predictor, seed: int, kind: str, args, f: Path, timed: bool) -> None:
    """Render one held-out phantom, predict it as the node does (and on two corrupted copies), keep all."""
    t = time.perf_counter()
    if kind == "foreign":
        ph = foreign.make_case(seed)
    elif kind == "whole":
        ph = make_case(seed, wide=bool(seed % 2), harsh=not seed % 2)
    else:
        ph = make_case(seed, wide=kind == "wide", harsh=kind == "harsh", n_slices=args.slices or None)
    vol = volume_of(ph)
    t0 = time.perf_counter()
    if timed:
        predictor.predict(vol.array, vol.row_dir, vol.col_dir, pixel_spacing=vol.pixel_spacing)
    t1 = time.perf_counter()
    pred = predictor.predict(vol.array, vol.row_dir, vol.col_dir, quality=True, tta=True,
                             pixel_spacing=vol.pixel_spacing)
    t2 = time.perf_counter()
    extra = {}
    if timed:
        extra["timing"] = json.dumps({"case": seed, "slices": int(vol.array.shape[0]), "plain_s": round(t1 - t0, 2),
                                      "with_quality_and_tta_s": round(t2 - t1, 2),
                                      **{k: round(v, 2) for k, v in pred.timings.items()}})
    out = {}
    for how, key in (("inverted contrast", "inv"), ("heavy noise", "noise")) if kind != "whole" else ():
        bad = predictor.predict(corrupt(vol.array, how, seed), vol.row_dir, vol.col_dir, quality=True, tta=True,
                                pixel_spacing=vol.pixel_spacing)
        out.update({f"{key}_labels": bad.labels, f"{key}_probs": bad.probs, f"{key}_tta": bad.tta_labels,
                    f"{key}_first": bad.first_labels})
    np.savez_compressed(f, truth=ph.labels, labels=pred.labels, probs=pred.probs, tta=pred.tta_labels,
                        first=pred.first_labels,
                        origins=vol.origins, row_dir=np.asarray(vol.row_dir), col_dir=np.asarray(vol.col_dir),
                        pixel_spacing=np.asarray(vol.pixel_spacing), slice_spacing=vol.slice_spacing,
                        scale=ph.anatomy.scale if ph.anatomy is not None else np.nan, **out, **extra)
    print(f"case {seed} ({kind}, {vol.array.shape}): render {t0 - t:.0f}s, predict {t1 - t0:.1f}s, "
          f"with probabilities + TTA {t2 - t1:.1f}s, corrupted copies {time.perf_counter() - t2:.0f}s", flush=True)


def predict_standin_case(predictor, data: Path, name: str, f: Path) -> None:
    """One case of a labelled data folder (DICOM series + bone masks), predicted as the node does, kept."""
    import SimpleITK as sitk

    from inference.dataset import read_labels, read_scan

    t = time.perf_counter()
    scan = read_scan(data, name)  # read once: the image, its geometry and the masks on its grid
    truth = read_labels(data, name, scan, tuple(DEFAULT_LABELS))
    image = sitk.GetArrayFromImage(scan).astype(np.float32)
    d = np.asarray(scan.GetDirection()).reshape(3, 3)
    spacing = scan.GetSpacing()
    origins = np.asarray(scan.GetOrigin())[None, :] + np.arange(image.shape[0])[:, None] * spacing[2] * d[:, 2]
    # SimpleITK's spacing is (columns, rows, slices); the node's pixel spacing is (row, column)
    vol = SeriesVolume(image, [], tuple(float(v) for v in d[:, 0]), tuple(float(v) for v in d[:, 1]),
                       (float(spacing[1]), float(spacing[0])), float(spacing[2]), origins)
    t0 = time.perf_counter()
    pred = predictor.predict(vol.array, vol.row_dir, vol.col_dir, quality=True, tta=True,
                             pixel_spacing=vol.pixel_spacing)
    np.savez_compressed(f, truth=truth, labels=pred.labels, probs=pred.probs, tta=pred.tta_labels,
                        first=pred.first_labels, origins=vol.origins, row_dir=np.asarray(vol.row_dir),
                        col_dir=np.asarray(vol.col_dir), pixel_spacing=np.asarray(vol.pixel_spacing),
                        slice_spacing=vol.slice_spacing, scale=np.nan)
    print(f"case {name} ({vol.array.shape}): read {t0 - t:.0f}s, predict with probabilities + TTA "
          f"{time.perf_counter() - t0:.0f}s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--foreign", type=int, default=0, help="foreign-family cases (whole volumes) to add")
    ap.add_argument("--foreign-seed", type=int, default=9000)
    ap.add_argument("--whole", type=int, default=0,
                    help="classic held-out cases as whole volumes (pelvis to feet; --slices ignored) to add")
    ap.add_argument("--whole-seed", type=int, default=8000)
    ap.add_argument("--standin", type=Path, help="a labelled data folder (e.g. the real-shape stand-in) to add, "
                                                 "every case as a whole volume")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of the summary (quality-thresholds.json)")
    ap.add_argument("--details", type=Path, default=ROOT / "bench" / "results" / "quality-thresholds",
                    help="folder of the per-case data (rows.json, cases.md); ignored by git")
    ap.add_argument("--predict-only", action="store_true", help="only fill the cache (to split the work)")
    ap.add_argument("--judge-only", action="store_true", help="only judge the cases already in the cache")
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL,
                    help="checkpoint to measure (default: the bundled model); a candidate is judged before it ships")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/quality-bench"),
                    help="predictions are kept under here, one folder per model (its hash), one npz per case, "
                         "and reused: re-judging takes seconds")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--slices", type=int, default=30,
                    help="slices per case: a window at a random height (0: the whole body, ~120 slices, slower)")
    ap.add_argument("--agreement", choices=("passes", "result"), default="passes",
                    help="compare the augmented pass with the unaugmented one (the node) or with the averaged result")
    ap.add_argument("--timed", type=int, default=2, help="cases on which predict is also timed without the gate")
    args = ap.parse_args()
    if not args.model.is_file():
        ap.error(f"--model {args.model}: no such checkpoint")
    model_sha = hashlib.sha256(args.model.read_bytes()).hexdigest()
    args.cache = args.cache / model_sha[:16]  # another model's predictions are never judged as this one's
    card = read_card(args.model)
    version = card.version
    SACRUM_IS_PELVIS["value"] = card.pelvis_includes_sacrum
    args.model_desc = (f"the bundled model (v{version})" if args.model.resolve() == BUNDLED_MODEL.resolve()
                       else f"`--model {args.model.name}` (v{version}, sha256 {model_sha[:12]}…)")
    predictor = None
    passes = (
        args.agreement == "passes"
    )  # the gate compares the two passes (the node) or the mean with the augmented one
    rows, timing = [], []
    args.cache.mkdir(parents=True, exist_ok=True)
    plan = [(args.seed + i, "harsh" if (args.seed + i) % 2 else "wide") for i in range(args.cases)]
    plan += [(args.foreign_seed + i, "foreign") for i in range(args.foreign)]
    plan += [(args.whole_seed + i, "whole") for i in range(args.whole)]
    if args.standin:
        from inference.dataset import list_cases

        plan += [(name, "standin") for name in list_cases(args.standin)]  # type: ignore[misc]
    for i, (seed, kind) in enumerate(plan):
        # harsh: small children to large adults, more noise and bias; foreign: the third phantom family
        stem = f"{kind}{seed}" if kind in ("foreign", "whole", "standin") else f"case{seed}"
        kept = sorted(args.cache.glob(f"{stem}_*.npz"))  # a case kept by an earlier run (any --slices)
        whole = kind in ("foreign", "whole", "standin")
        f = kept[0] if kept else args.cache / f"{stem}_{0 if whole else args.slices}.npz"
        if not f.is_file():  # predicting is the slow part: kept, so thresholds can be re-judged in seconds
            if args.judge_only:
                continue
            predictor = predictor or Predictor(args.model, device="cpu", threads=args.threads)
            if kind == "standin":
                predict_standin_case(predictor, args.standin, str(seed), f)
            else:
                predict_case(predictor, seed, kind, args, f, i < args.timed)  # type: ignore[arg-type]
        if args.predict_only:
            continue
        c = np.load(f, allow_pickle=False)
        vol = SeriesVolume(np.zeros(c["truth"].shape, np.float32), [], tuple(c["row_dir"]), tuple(c["col_dir"]),
                           tuple(c["pixel_spacing"]), float(c["slice_spacing"]), c["origins"])
        if "timing" in c.files:
            timing.append(json.loads(str(c["timing"])))
        base = {"case": seed, "set": kind, "slices": int(vol.array.shape[0]),
                "matrix": list(vol.array.shape[1:]),
                "scale": None if np.isnan(float(c["scale"])) else round(float(c["scale"]), 2)}
        truth = c["truth"]
        d = dices(c["labels"], truth)
        lowest = min(d.values(), default=float("nan"))  # nothing scored: neither good nor poor
        quality = "poor" if lowest < 0.7 else "good" if lowest >= 0.85 else "between"
        single = dices(c["first"], truth) if "first" in c.files else None  # the unaugmented pass alone
        rows.append(
            {
                **base,
                "variant": "as predicted",
                "class": quality,
                "damaged": False,
                "dice": d,
                "dice_single_pass": single,
                **judge(vol, c["labels"], c["probs"], c["tta"], first=c.get("first") if passes else None),
                "anatomy_only": judge(vol, c["labels"], None, None, False)["verdict"],
            }
        )
        for name, lab in damages(c["labels"], float(vol.pixel_spacing[1])):
            rows.append({**base, "variant": name, "damaged": True, "dice": dices(lab, truth),
                         **judge(vol, lab, c["probs"], c["tta"]),
                         "anatomy_only": judge(vol, lab, None, None, False)["verdict"]})
        for how, key in (("inverted contrast", "inv"), ("heavy noise", "noise")):
            if f"{key}_labels" not in c.files:  # whole volumes: only the prediction and its damages
                continue
            rows.append({**base, "variant": f"model on {how}", "damaged": True,
                         "dice": dices(c[f"{key}_labels"], truth),
                         **judge(vol, c[f"{key}_labels"], c[f"{key}_probs"], c[f"{key}_tta"],
                                 first=c.get(f"{key}_first") if passes else None),
                         "anatomy_only": judge(vol, c[f"{key}_labels"], None, None, False)["verdict"]})
    if args.predict_only:
        return 0
    report = summarise(rows, timing)
    run = {"cases": args.cases, "seed": args.seed, "foreign": args.foreign, "foreign_seed": args.foreign_seed,
           "standin": str(args.standin) if args.standin else None,
           "whole": args.whole, "whole_seed": args.whole_seed, "slices": args.slices, "agreement": args.agreement,
           "model": args.model_desc, "thresholds": THRESHOLDS, "area_bounds_cm2": AREA_BOUNDS_CM2}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality-thresholds.json").write_text(json.dumps({"summary": report, "run": run}, indent=1) + "\n")
    args.details.mkdir(parents=True, exist_ok=True)
    (args.details / "rows.json").write_text(json.dumps({"summary": report, "rows": rows, "timing": timing}, indent=1))
    (args.details / "cases.md").write_text(markdown(report, rows, timing, args))
    print(json.dumps(report, indent=1))
    return 0


def _low(r: dict) -> bool:
    return bool(r["dice"]) and min(r["dice"].values()) < 0.7


def summarise(rows: list[dict], timing: list[dict]) -> dict:
    good = [r for r in rows if not r["damaged"] and r["class"] == "good"]
    between = [r for r in rows if not r["damaged"] and r["class"] == "between"]
    poor = [r for r in rows if not r["damaged"] and r["class"] == "poor"]
    # must be caught: every result (damaged or as the model made it) with some structure's Dice < 0.7
    bad = [r for r in rows if _low(r)]
    mild = [r for r in rows if r["damaged"] and not _low(r)]
    per_set = {}
    for name in sorted({r["set"] for r in rows}):
        g = [r for r in good if r["set"] == name]
        b = [r for r in bad if r["set"] == name]
        per_set[name] = {"good": len(g), "good_not_failed": sum(r["verdict"] != "fail" for r in g),
                         "must_catch": len(b), "caught": sum(r["verdict"] == "fail" for r in b)}
    metric = {}
    for key in ("confidence", "tta_dice", "area_cm2", "fibula_larger_share",
                "pelvis_reach_heads"):
        per_bone: dict[str, list[float]] = {}
        for r in good:
            for s, m in r["metrics"].items():
                if key in m:
                    per_bone.setdefault(s.split()[0], []).append(m[key])
        metric[key] = {b: [round(min(v), 3), round(max(v), 3)] for b, v in sorted(per_bone.items())}
    plain = sum(t["plain_s"] for t in timing)
    both = sum(t["with_quality_and_tta_s"] for t in timing)
    # within one call, under the same load: the network's own pass against the augmented pass
    stage_predict = sum(t.get("predict", 0.0) for t in timing)
    stage_tta = sum(t.get("tta", 0.0) for t in timing)
    return {
        "good": len(good),
        "good_pass": sum(r["verdict"] == "pass" for r in good),
        "good_not_failed": sum(r["verdict"] != "fail" for r in good),
        "between": len(between),
        "between_not_failed": sum(r["verdict"] != "fail" for r in between),
        "poor_as_predicted": len(poor),
        "poor_caught": sum(r["verdict"] == "fail" for r in poor),
        "dice_below_0.7": len(bad),
        "caught": sum(r["verdict"] == "fail" for r in bad),
        "caught_by_anatomy_only": sum(r["anatomy_only"] == "fail" for r in bad),
        "per_set": per_set,
        "damaged_dice_at_least_0.7": len(mild),
        "of_those_failed": sum(r["verdict"] == "fail" for r in mild),
        "good_metric_ranges": metric,
        "predict_seconds_plain": round(plain, 1),
        "predict_seconds_with_quality_and_tta": round(both, 1),
        "tta_cost_factor": round(both / plain, 2) if plain else None,
        "predict_stage_s": round(stage_predict, 1),
        "tta_stage_s": round(stage_tta, 1),
        "predict_stage_factor_with_tta": round((stage_predict + stage_tta) / stage_predict, 2)
        if stage_predict
        else None,
    }


def markdown(s: dict, rows: list[dict], timing: list[dict], args) -> str:
    bones = sorted(s["good_metric_ranges"].get("area_cm2", {}))  # none when no result was good
    lines = [
        "# Quality gate: measurements behind the thresholds",
        "",
        f"`bench/quality_thresholds.py --cases {args.cases} --seed {args.seed}` with {args.model_desc} "
        f"(held-out phantoms, alternately `--wide` and `--harsh`, seeds {args.seed}-{args.seed + args.cases - 1}"
        + (
            f"; and {args.foreign} foreign-family cases, `--foreign {args.foreign} --foreign-seed {args.foreign_seed}`"
            if args.foreign
            else ""
        )
        + (
            f"; and {args.whole} whole-volume held-out phantoms, `--whole {args.whole} --whole-seed {args.whole_seed}`"
            if args.whole
            else ""
        )
        + (f"; and every case of `--standin {args.standin}`" if args.standin else "")
        + ").",
        "",
        "| | count | gate verdict |",
        "|---|---|---|",
        f"| as predicted, good (every Dice ≥ 0.85) | {s['good']} | {s['good_pass']} pass, {s['good_not_failed']} "
        f"not failed ({100 * s['good_not_failed'] / max(s['good'], 1):.0f} % sent) |",
        f"| as predicted, in between | {s['between']} | {s['between_not_failed']} not failed |",
        f"| as predicted, poor (some Dice < 0.7) | {s['poor_as_predicted']} | {s['poor_caught']} fail |",
        f"| all results with some structure's Dice < 0.7 (damaged or poor) | {s['dice_below_0.7']} | "
        f"{s['caught']} fail "
        f"({100 * s['caught'] / max(s['dice_below_0.7'], 1):.0f} % caught; anatomy checks alone: "
        f"{s['caught_by_anatomy_only']}) |",
        f"| damaged, every Dice ≥ 0.7 | {s['damaged_dice_at_least_0.7']} | {s['of_those_failed']} fail |",
        "",
        f"Prediction time for the {len(timing)} cases: {s['predict_seconds_plain']} s plain, "
        f"{s['predict_seconds_with_quality_and_tta']} s with probabilities and the TTA pass "
        f"(× {s['tta_cost_factor']}, wall clock on a shared 2-core CPU, so noisy); within the same calls "
        f"the network's pass took {s['predict_stage_s']} s and the augmented pass {s['tta_stage_s']} s: the "
        f"predict stage costs × {s['predict_stage_factor_with_tta']} with `quality.tta = true`.",
        "",
        "Per set (good: sent / all; Dice < 0.7: caught / all): "
        + "; ".join(
            f"{k} {v['good_not_failed']}/{v['good']}, {v['caught']}/{v['must_catch']}" for k, v in s["per_set"].items()
        )
        + ".",
        "",
        "Ranges of each measure over the good predictions (min, max per bone):",
        "",
        "| measure | " + " | ".join(bones) + " |",
        "|---|" + "---|" * len(bones),
    ]
    for key, per in s["good_metric_ranges"].items():
        lines.append(f"| {key} | " + " | ".join(f"{per[b][0]}–{per[b][1]}" if b in per else "–" for b in bones)
                     + " |")
    lines += ["", "Thresholds in force (dicom_node/gate/quality.py):", "", "```",
              json.dumps(THRESHOLDS, indent=1), "mean cross-section bounds cm² (fail<, warn<, warn>, fail>): "
              + json.dumps(AREA_BOUNDS_CM2), "```", "",
              "| case | set | variant | min Dice | verdict | anatomy only | why |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md = min(r["dice"].values()) if r["dice"] else float("nan")
        variant = r["variant"] + (f" ({r['class']})" if not r["damaged"] else "")
        lines.append(f"| {r['case']} | {r['set']} | {variant} | {md:.2f} | {r['verdict']} | {r['anatomy_only']} | "
                     f"{r['summary'][:220].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
