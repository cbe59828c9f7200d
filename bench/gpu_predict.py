"""Whole-series prediction time on a GPU: the node's Predictor on a 1000-slice series, end to end
(preprocessing, batched network, inverse mapping, 3D clean-up), beside the network alone.

Why a separate script: bench/run.py measures the CPU side by side with its references and takes minutes
on a CPU before it reaches the GPU; a lent GPU machine is held for minutes only. Run it there as
``python3 bench/gpu_predict.py --model M --slices 1000`` (needs torch, numpy, scipy,
segmentation-models-pytorch, safetensors); it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def series(n: int, size: int) -> np.ndarray:
    """A smooth int16 volume with bright and dark blobs: content does not change the network's cost, but
    the clean-up after it depends on how many pieces it finds, so the input is not plain noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    vol = np.empty((n, size, size), np.int16)
    for k in range(n):
        img = 300 + 50 * rng.standard_normal((size, size))
        for cx, cy, r, v in ((size * .3, size * .5, size * .12, 900), (size * .7, size * .5, size * .12, 900),
                             (size * .3, size * .5, size * .04, 100), (size * .7, size * .5, size * .04, 100)):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = v
        vol[k] = img
    return vol


def main() -> int:
    import torch

    from inference.model import BUNDLED_MODEL
    from inference.predict import Predictor

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-sizes", default="16,64,128")
    args = ap.parse_args()
    vol = series(args.slices, args.size)
    out = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "slices": args.slices, "matrix": args.size, "runs": []}
    for bs in map(int, args.batch_sizes.split(",")):
        p = Predictor(args.model, device="auto", batch_size=bs, precision="auto")
        p.predict(vol[:64], (1, 0, 0), (0, 1, 0))  # warm-up: cuDNN autotune, allocator
        if p.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        pred = p.predict(vol, (1, 0, 0), (0, 1, 0))
        sec = time.perf_counter() - t
        run = {"batch": bs, "device": str(p.device), "precision": str(p.dtype).split(".")[-1], "seconds": sec,
               "slices_s": args.slices / sec, "stages": pred.timings}
        if p.device.type == "cuda":
            run["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 1e6
        out["runs"].append(run)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
