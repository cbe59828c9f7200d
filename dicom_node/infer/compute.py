"""The compute part of a job: a stacked series → volume(s) → the model's labels → sided segments and volumes.

No database, no files written, no network: the orchestrator (``dicom_node.pipeline``) records what comes
out, and the encode and deliver stages take it from there. A series that turns out not to be segmentable
raises :class:`NotSegmentable` with the reason in words (the job is then ``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.model_card import ModelCard

from ..slices import stack_blocks
from .segments import Segment, split_sides
from .volume import NotStackable, SeriesVolume, load_series


class NotSegmentable(Exception):
    """The series cannot be segmented (its files no longer stack, or a block cannot be loaded)."""


@dataclass
class SeriesResult:
    """What the model made of one series, on the source grid, ready to encode."""

    volume: SeriesVolume
    labels: np.ndarray            # sided label map in the volume's order (0 background, segment numbers)
    segments: list[Segment]
    volumes_cm3: dict[str, float]  # per segment name
    card: ModelCard                # the model card of the predictor that made it
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    #: for the quality gate (``quality=True``): class probabilities (classes, n, rows, cols) uint8 0-255, and
    #: the unsided labels of the test-time-augmented pass (``tta=True``), both in the volume's order; with
    #: that pass ``labels`` and ``probs`` are the mean of both passes, and ``first_labels`` (unsided) the
    #: plain pass alone, which the gate compares with the augmented one
    probs: np.ndarray | None = None
    tta_labels: np.ndarray | None = None
    first_labels: np.ndarray | None = None

    @property
    def source_order_labels(self) -> np.ndarray:
        return self.volume.to_source_order(self.labels)


def segment_series(instances: list, predictor, timing: Callable[[str, float], None] | None = None,
                   quality: bool = False, tta: bool = False,
                   locate: Callable[[str], str | Path] | None = None) -> SeriesResult:
    """Load, predict and split into sides. ``timing(stage, seconds)`` is called for each stage as it ends;
    ``locate`` turns an instance's stored path into its file (the file store's ``resolve``).

    ``quality`` keeps the model's probabilities and ``tta`` runs the test-time-augmented pass, both for the
    quality gate (gate/quality.py).
    """
    import time

    note = timing or (lambda stage, seconds: None)
    t = time.perf_counter()
    blocks, why = stack_blocks(instances)
    if blocks is None:  # cannot happen for a job the rules queued, unless files changed since
        raise NotSegmentable(why)
    try:
        # one block, unless the series has gaps between stations: each block is its own volume
        parts = [load_series(block, locate) for block in blocks]
    except NotStackable as exc:
        raise NotSegmentable(str(exc)) from None
    note("load", time.perf_counter() - t)
    preds = [predictor.predict(v.array, v.row_dir, v.col_dir, quality=quality, tta=tta, pixel_spacing=v.pixel_spacing)
             for v in parts]
    for stage in ("preprocess", "predict", "tta", "postprocess"):
        if any(stage in p.timings for p in preds):
            note(stage, sum(p.timings.get(stage, 0.0) for p in preds))
    vol = SeriesVolume.join(parts)
    labels = preds[0].labels if len(preds) == 1 else np.concatenate([p.labels for p in preds])
    card = predictor.card
    first = vol.datasets[0]
    declared = str(first.get("ImageLaterality", "") or first.get("Laterality", "")).upper()
    seg_labels, segments = split_sides(labels, card.labels, vol.origins, vol.row_dir, vol.col_dir,
                                       vol.pixel_spacing, declared)
    cm3 = vol.volumes_cm3(seg_labels, len(segments) + 1)
    vols = {sg.name: float(cm3[sg.number]) for sg in segments}
    probs = _joined(preds, "probs", axis=1) if quality else None
    tta_labels = _joined(preds, "tta_labels") if tta else None
    first_labels = _joined(preds, "first_labels") if tta else None
    return SeriesResult(volume=vol, labels=seg_labels, segments=segments, volumes_cm3=vols, card=card,
                        device=str(predictor.device), probs=probs, tta_labels=tta_labels,
                        first_labels=first_labels)


def _joined(preds: list, name: str, axis: int = 0) -> np.ndarray | None:
    """One attribute of every block's prediction, joined along the slices (None if any block lacks it)."""
    parts = [getattr(p, name) for p in preds]
    if any(a is None for a in parts):
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
