"""Batched 2D prediction of a whole series, returning a label map on the source pixel grid.

One :class:`Predictor` holds one loaded model for the life of the worker: loading a ResNet34 U-Net takes
seconds, a job should not pay that each time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from .model import load_model, pick_device, pick_precision
from .model_card import ModelCard
from .postprocess import clean_labels
from .preprocessing import (
    body_box,
    from_model_output,
    intensity_range,
    orient,
    plan_transform,
    reaches_hips,
    to_model_input,
    unorient,
)

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    labels: np.ndarray  # (n, rows, cols) uint8 on the source grid, slice order as given
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    #: with ``quality=True``: softmax probability of each class, (classes, n, rows, cols) uint8 (0-255 for
    #: 0-1), for the quality gate's confidence measure (uint8: a 512² series stays a few hundred MB at most)
    probs: np.ndarray | None = None
    #: with ``tta=True``: the labels of a second, test-time-augmented pass (input mirrored left-right and
    #: gamma-shifted, output mirrored back), cleaned like ``labels``; the gate measures their agreement.
    #: ``labels`` and ``probs`` are then the average of both passes (see :func:`predict_volume`), and
    #: ``first_labels`` what the unaugmented pass alone would have given (cleaned), for comparisons
    tta_labels: np.ndarray | None = None
    first_labels: np.ndarray | None = None

#: Gamma applied to the normalised input in the test-time-augmented pass (x ** 0.8 brightens mid-greys):
#: a contrast change a second scanner or protocol could make, within what training augmentation covers.
TTA_GAMMA = 0.8


class Predictor:
    """A loaded model and the code that runs it on volumes."""

    def __init__(self, model_path: Path, device: str = "auto", batch_size: int = 16, threads: int = 0,
                 precision: str = "auto", compile: bool = False):
        self.device = pick_device(device)
        self.dtype = pick_precision(precision, self.device)
        if threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.net, self.card = load_model(Path(model_path), self.device)
        self.model_path = Path(model_path)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one series on the model at a time
        self.compiled = False
        if compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile (inductor) for one fixed input shape, compiled now rather than in the first job.

        Why fixed: every batch is padded to ``batch_size`` (the slices are always the card's input size), so
        one compilation serves every series; a new shape would recompile for tens of seconds. Measured on
        the project's CPU: +8–16 % slices/s after 12–24 s of compilation (BENCHMARKS.md). Without a working
        compiler toolchain the model simply runs uncompiled.
        """
        t0 = time.perf_counter()
        try:
            net = torch.compile(self.net, dynamic=False)
            size = self.card.input_size
            x = torch.zeros(self.batch_size, self.card.in_channels, size, size, device=self.device)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with self._lock, torch.inference_mode(), torch.autocast(
                    device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                net(x)
        except Exception as exc:  # no C compiler, unsupported platform or op: run eagerly, say why
            log.warning("torch.compile failed, running the model uncompiled: %s: %s", type(exc).__name__,
                        str(exc)[:300])
            return
        # torch.compile of a module gives a module (OptimizedModule); its stub says any callable
        self.net, self.compiled = cast(torch.nn.Module, net), True
        log.info("model compiled for batches of %d in %.1f s", self.batch_size, time.perf_counter() - t0)

    def predict(self, volume: np.ndarray, row_dir, col_dir, postprocess: bool = True, quality: bool = False,
                tta: bool = False, pixel_spacing: tuple[float, float] | None = None) -> Prediction:
        """Segment ``volume`` (n, rows, cols) whose slices have the given DICOM in-plane directions.

        ``pixel_spacing`` (row, column mm) lets the network see only the body's box (``body_box``): pass it
        wherever it is known, as the node does; without it the whole field of view is used.

        ``quality`` also returns the class probabilities, ``tta`` the labels of a test-time-augmented pass
        (for the quality gate; the TTA pass runs the network a second time, and the result is the average of
        both passes).
        """
        return predict_volume(self.net, self.card, volume, row_dir, col_dir, self.device, self.batch_size,
                              postprocess, self._lock, self.dtype, pad_batches=self.compiled,
                              quality=quality, tta=tta, pixel_spacing=pixel_spacing)


def predict_volume(net: torch.nn.Module, card: ModelCard, volume: np.ndarray, row_dir, col_dir,
                   device: torch.device, batch_size: int = 16, postprocess: bool = True,
                   lock: threading.Lock | None = None, dtype: torch.dtype = torch.float32,
                   pad_batches: bool = False, quality: bool = False, tta: bool = False,
                   pixel_spacing: tuple[float, float] | None = None) -> Prediction:
    """Segment a volume slice by slice in batches; see :meth:`Predictor.predict`.

    With ``pixel_spacing`` (the node always gives it) the network sees only the body's bounding box
    (``preprocessing.body_box``) and everything outside it is background: a small patient in a large field of
    view reaches the network at the size it learned bones at.

    With ``tta`` the labels are the argmax of the mean of both passes' class probabilities (and ``probs`` that
    mean): the gate runs the augmented pass anyway, and averaging the two views is free accuracy — measured on
    the three held-out sets nearly every structure's mean Dice rose (foreign family: femur 0.894 → 0.905,
    fibula 0.905 → 0.916, pelvis 0.727 → 0.735; README, "Averaging the two passes"). Where the augmented
    pass is badly wrong the mean inherits part of it, which is why the gate compares the two passes.
    """
    if pixel_spacing is not None:
        t0 = time.perf_counter()
        box = body_box(volume, pixel_spacing)
        t_box = time.perf_counter() - t0
        if box is not None:
            # the whole field of view first: only a series that reaches the hips is narrowed. Its box is then set
            # by the widest part of the body, the pelvis; a series of calves alone, narrower than its field of
            # view, would be magnified until the tibia has the femur's size in the input (tibia called femur,
            # tests/test_input_variety.py's two-station series). Twice the network, only for such series.
            whole = predict_volume(net, card, volume, row_dir, col_dir, device, batch_size, postprocess, lock, dtype,
                                   pad_batches, quality, tta)
            if not reaches_hips(whole.labels, card.labels):
                whole.timings["preprocess"] = whole.timings.get("preprocess", 0.0) + t_box
                return whole
            t1 = time.perf_counter()
            cropped = np.ascontiguousarray(volume[:, box[0], box[1]])
            t_box += time.perf_counter() - t1
            inner = predict_volume(net, card, cropped, row_dir, col_dir, device, batch_size, postprocess, lock, dtype,
                                   pad_batches, quality, tta)
            t1 = time.perf_counter()
            placed = _placed(inner, volume.shape, box)
            for stage, seconds in whole.timings.items():  # both passes' time, stage by stage
                placed.timings[stage] = placed.timings.get(stage, 0.0) + seconds
            placed.timings["preprocess"] = placed.timings.get("preprocess", 0.0) + t_box + time.perf_counter() - t1
            return placed
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n, rows, cols = volume.shape
    t = plan_transform(rows, cols, row_dir, col_dir, card.input_size)
    canon = orient(volume, t)
    lo, hi = intensity_range(canon, card.normalisation)
    out = np.empty((n,) + t.shape, dtype=np.uint8)
    n_classes = len(card.labels) + 1
    probs = np.empty((n_classes, n) + t.shape, dtype=np.uint8) if quality else None
    out_tta = np.empty((n,) + t.shape, dtype=np.uint8) if tta else None
    out_first = np.empty((n,) + t.shape, dtype=np.uint8) if tta else None
    timings["preprocess"] = time.perf_counter() - t0
    t_pred = t_tta = 0.0
    use_amp = dtype != torch.float32
    lock = lock or threading.Lock()
    with lock, torch.inference_mode():
        for start in range(0, n, batch_size):
            tb = time.perf_counter()
            x = to_model_input(canon[start:start + batch_size], lo, hi, t, card.in_channels, device)
            k = x.shape[0]
            if pad_batches and k < batch_size:  # a compiled model keeps one input shape
                x = torch.cat([x, x.new_zeros((batch_size - k,) + tuple(x.shape[1:]))])
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
                logits = net(x)
            logits = from_model_output(logits[:k].float(), t)
            p = logits.softmax(1) if probs is not None or out_tta is not None else None
            t_pred += time.perf_counter() - tb
            if out_tta is not None:
                tb = time.perf_counter()
                # mirrored left-right and gamma-shifted; the square padding is symmetric, so mirroring the
                # model's output back lands every pixel where it came from
                xa = torch.flip(x, dims=[-1]).pow(TTA_GAMMA)
                with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
                    la = net(xa)
                la = from_model_output(torch.flip(la[:k].float(), dims=[-1]), t)
                assert p is not None and out_first is not None, "the augmented pass comes with both"
                out_tta[start:start + batch_size] = la.argmax(1).to(torch.uint8).cpu().numpy()
                out_first[start:start + batch_size] = logits.argmax(1).to(torch.uint8).cpu().numpy()
                p = p.add_(la.softmax(1)).mul_(0.5)  # the result: the mean of both views
                t_tta += time.perf_counter() - tb
            tb = time.perf_counter()
            out[start:start + batch_size] = (p if p is not None else logits).argmax(1).to(torch.uint8).cpu().numpy()
            if probs is not None:
                assert p is not None, "probabilities are computed whenever they are kept"
                scaled = (p * 255.0).round_().to(torch.uint8).cpu().numpy()
                probs[:, start:start + batch_size] = scaled.transpose(1, 0, 2, 3)
            t_pred += time.perf_counter() - tb
    timings["predict"] = t_pred
    if out_tta is not None:
        timings["tta"] = t_tta
    labels = unorient(out, t)
    tta_labels = unorient(out_tta, t) if out_tta is not None else None
    first_labels = unorient(out_first, t) if out_first is not None else None
    if probs is not None:
        probs = np.stack([unorient(probs[c], t) for c in range(n_classes)])
    if postprocess:
        t1 = time.perf_counter()
        names = {lab.value: lab.name for lab in card.labels}
        labels = clean_labels(labels, names)
        if tta_labels is not None and first_labels is not None:  # the augmented pass makes both
            tta_labels = clean_labels(tta_labels, names)
            first_labels = clean_labels(first_labels, names)
        timings["postprocess"] = time.perf_counter() - t1
    return Prediction(labels, timings, probs, tta_labels, first_labels)


def _placed(inner: Prediction, shape: tuple[int, ...], box: tuple[slice, slice]) -> Prediction:
    """A prediction made on the body's box, placed on the whole grid: background everywhere outside it."""

    def full(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        out = np.zeros(shape, dtype=a.dtype)
        out[:, box[0], box[1]] = a
        return out

    probs = None
    if inner.probs is not None:
        probs = np.zeros((inner.probs.shape[0],) + tuple(shape), dtype=inner.probs.dtype)
        probs[0] = 255  # background, certain
        probs[:, :, box[0], box[1]] = inner.probs
    labels = full(inner.labels)
    assert labels is not None
    return Prediction(labels, inner.timings, probs, full(inner.tta_labels), full(inner.first_labels))
