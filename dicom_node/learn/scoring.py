"""How far the node's result was from the radiologist's correction: Dice and volumes per structure and side.

Both label maps are class maps on the same source grid (learn/segread.py). Sides are taken from patient
coordinates the way the node splits them (infer/segments.py ``split_sides``), once, on the union of both
maps: a bone the node missed on one side and the radiologist drew is still scored on that side, and a
piece cannot change side between the two maps because a midline moved. The result is the Correction
model's ``metrics`` JSON (storage/models.py): per ``"<structure>_<side>"`` and per ``"<structure>"``
``{"dice", "volume_sent_cm3", "volume_corrected_cm3", "volume_diff_cm3"}`` (diff = corrected − sent), and
``mean_dice`` over the structures (without side) present in either map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.labels import DEFAULT_LABELS, Label

from ..infer.segments import split_sides
from .segread import SourceGrid

SIDE_WORDS = {"L": "left", "R": "right"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty (nothing to disagree on)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def side_map(sent: np.ndarray, corrected: np.ndarray, grid: SourceGrid,
             labels: Sequence[Label] = DEFAULT_LABELS, declared: str = "") -> np.ndarray:
    """"L", "R" or "" per voxel of either map (uint8 codes: 0 none, 1 R, 2 L), from one side split of the
    union (the correction's class where it has one, else the sent one)."""
    union = np.where(corrected > 0, corrected, sent).astype(np.uint8)
    seg_labels, segments = split_sides(union, list(labels), grid.origins, grid.row_dir, grid.col_dir,
                                       grid.pixel_spacing, declared)
    code = np.zeros(len(segments) + 1, dtype=np.uint8)
    for sg in segments:
        code[sg.number] = {"R": 1, "L": 2}.get(sg.side, 0)
    return code[seg_labels]


def _entry(a: np.ndarray, b: np.ndarray, mm3: float) -> dict[str, float]:
    sent_cm3 = float(a.sum()) * mm3 / 1000.0
    corr_cm3 = float(b.sum()) * mm3 / 1000.0
    return {"dice": round(dice(a, b), 4), "volume_sent_cm3": round(sent_cm3, 2),
            "volume_corrected_cm3": round(corr_cm3, 2), "volume_diff_cm3": round(corr_cm3 - sent_cm3, 2)}


def score(sent: np.ndarray, corrected: np.ndarray, grid: SourceGrid, labels: Sequence[Label] = DEFAULT_LABELS,
          declared: str = "") -> tuple[dict, float | None]:
    """(metrics, mean_dice) of ``sent`` against ``corrected`` (class maps on ``grid``); mean_dice None when
    neither map has any structure."""
    if sent.shape != corrected.shape:
        raise ValueError(f"label maps of different shapes {sent.shape} and {corrected.shape}")
    mm3 = grid.pixel_spacing[0] * grid.pixel_spacing[1] * grid.slice_spacing
    sides = side_map(sent, corrected, grid, labels, declared)
    metrics: dict[str, dict[str, float]] = {}
    dices = []
    for lab in labels:
        a, b = sent == lab.value, corrected == lab.value
        if not a.any() and not b.any():
            continue
        key = lab.name.lower()
        metrics[key] = _entry(a, b, mm3)
        dices.append(metrics[key]["dice"])
        for code, side in ((1, "right"), (2, "left")):
            here = sides == code
            a_s, b_s = a & here, b & here
            if a_s.any() or b_s.any():
                metrics[f"{key}_{side}"] = _entry(a_s, b_s, mm3)
    mean = round(float(np.mean(dices)), 4) if dices else None
    return metrics, mean
