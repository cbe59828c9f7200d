"""Where the time after the network goes: post-processing, side splitting, the quality gate and encoding of
one whole-leg series, per function (cProfile), on the outputs the network produced for it.

    .venv/bin/python bench/profile_stages.py                    # renders a 448² whole-leg series, runs the model once
    .venv/bin/python bench/profile_stages.py --cache /tmp/leg.npz --top 15

The network runs once (its outputs are cached with ``--cache``, so profiling runs repeat only the work
after it); each stage then runs as the worker runs it (``inference.predict`` cleaning, ``infer.compute``
sides and volumes, ``gate.quality.assess``, ``encode.results.encode_results``), timed ``--repeat`` times,
and profiled once.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_volume(folder: Path):
    """The series as the worker loads it (files written in acquisition order, one block)."""
    from dicom_node.infer.volume import load_series

    files = sorted(folder.glob("*.dcm"))
    return load_series([SimpleNamespace(path=str(p), frames=1, instance_number=k + 1) for k, p in enumerate(files)])


def network_outputs(vol, cache: Path | None, model: Path | None):
    """The model's raw outputs (labels, probabilities, augmented and plain passes' labels), uncleaned."""
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    from dicom_node.config import Settings
    from inference.predict import Predictor

    predictor = Predictor(model or Settings().model_path)
    pred = predictor.predict(vol.array, vol.row_dir, vol.col_dir, postprocess=False, quality=True, tta=True,
                             pixel_spacing=vol.pixel_spacing)
    out = {"labels": pred.labels, "probs": pred.probs, "tta_labels": pred.tta_labels,
           "first_labels": pred.first_labels}
    print("network s: " + ", ".join(f"{k} {v:.2f}" for k, v in pred.timings.items()), flush=True)
    if cache is not None:
        np.savez(cache, **out)
    return out


def stages(vol, raw: dict, work: Path):
    """The steps after the network, as callables sharing their results (each needs the one before)."""
    import torch

    from dicom_node.config import Settings
    from dicom_node.encode.results import encode_results
    from dicom_node.gate.quality import assess
    from dicom_node.infer.compute import SeriesResult
    from dicom_node.infer.segments import split_sides
    from inference.model import load_model
    from inference.postprocess import clean_labels

    _, card = load_model(Settings().model_path, torch.device("cpu"))
    names = {lab.value: lab.name for lab in card.labels}
    state: dict = {}

    def postprocess():
        state["labels"] = clean_labels(raw["labels"], names)
        state["tta_labels"] = clean_labels(raw["tta_labels"], names)
        state["first_labels"] = clean_labels(raw["first_labels"], names)

    def sides():
        first = vol.datasets[0]
        declared = str(first.get("ImageLaterality", "") or first.get("Laterality", "")).upper()
        seg, segments = split_sides(state["labels"], card.labels, vol.origins, vol.row_dir, vol.col_dir,
                                    vol.pixel_spacing, declared)
        cm3 = vol.volumes_cm3(seg, len(segments) + 1)
        state["result"] = SeriesResult(volume=vol, labels=seg, segments=segments, card=card, device="cpu",
                                       volumes_cm3={sg.name: float(cm3[sg.number]) for sg in segments})

    def quality():
        r = state["result"]
        state["report"] = assess(vol, r.labels, r.segments, card.labels, raw["probs"], state["tta_labels"],
                                 first_labels=state["first_labels"], sacrum_is_pelvis=card.pelvis_includes_sacrum)

    def encode():
        job = work / f"job{time.monotonic_ns()}"
        job.mkdir(parents=True)
        encode_results(Settings(), state["result"], job)

    return {"postprocess": postprocess, "sides": sides, "quality": quality, "encode": encode}, state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=Path, help="a folder of one series' files (default: render a whole leg)")
    ap.add_argument("--cache", type=Path, help="npz of the network's outputs: read if present, else written")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="profile-stages-"))
    folder = args.series
    if folder is None:
        from bench.peers import whole_leg_study

        folder = work / "series"
        whole_leg_study(folder, seed=7)
    vol = load_volume(folder)
    print(f"series: {vol.array.shape[0]} slices of {vol.array.shape[1]}x{vol.array.shape[2]}", flush=True)
    raw = network_outputs(vol, args.cache, args.model)
    steps, state = stages(vol, raw, work)
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    print(f"best of {args.repeat}, s: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    print("verdict:", state["report"].summary()[:300])
    for name, fn in steps.items():
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
        print(f"\n== {name} (by own time)")
        print("\n".join(lines[start:start + args.top + 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
