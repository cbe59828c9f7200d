"""Inference and SEG encoding: the network against the FLOP floor from a measured matmul and convolution rate,
and the SEG writer on 120- and 1000-frame results."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


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
