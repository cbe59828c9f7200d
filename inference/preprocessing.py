"""From a stack of slices on the scanner's grid to the model's input, and exactly back.

The model sees every slice the same way whatever the acquisition: the field of view narrowed to the body
(``body_box``), in-plane axes turned to the canonical axial view (columns toward patient left, rows toward
posterior), intensities min–max normalised, the slice padded to a square and resized to the card's input
size. Training on cases (``inference.training``, the learning rounds) uses the same functions, so the model
learns what inference feeds it. The way back (``from_model_output``) is the exact inverse: resizing with
``align_corners=False`` in both directions maps pixel centres onto pixel centres, and the padding and axis
changes are undone, so a label lands on the voxel it was predicted for — no half-pixel shift, no flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import DEFAULT_LABELS, Label


@dataclass(frozen=True)
class SliceTransform:
    """How one series' slices are turned into model input (and back)."""

    transpose: bool  # swap rows and columns first
    flip_rows: bool  # then reverse the row index
    flip_cols: bool  # then reverse the column index
    shape: tuple[int, int]  # (rows, cols) after orientation, before padding
    pad: tuple[int, int, int, int]  # top, bottom, left, right
    size: int  # model input size

    @property
    def padded(self) -> int:
        return self.shape[0] + self.pad[0] + self.pad[1]


def plan_transform(rows: int, cols: int, row_dir, col_dir, size: int) -> SliceTransform:
    """Choose axis swaps/flips that bring a slice to the canonical view, and the square padding.

    ``row_dir`` is DICOM's direction along a row (first 3 values of ImageOrientationPatient), ``col_dir``
    the direction down a column. Canonical: along a row toward +x (patient left), down a column toward
    +y (posterior), as a standard axial DICOM image. For non-axial planes the dominant axes are used.
    """
    rd, cd = np.asarray(row_dir, float), np.asarray(col_dir, float)
    # which in-plane image axis points most along patient x?
    transpose = abs(cd[0]) > abs(rd[0])
    if transpose:
        rd, cd = cd, rd
        rows, cols = cols, rows
    # after transpose: columns advance along rd, rows advance along cd
    flip_cols = rd[int(np.argmax(np.abs(rd)))] < 0
    flip_rows = cd[int(np.argmax(np.abs(cd)))] < 0
    side = max(rows, cols)
    pr, pc = side - rows, side - cols
    pad = (pr // 2, pr - pr // 2, pc // 2, pc - pc // 2)
    return SliceTransform(transpose, flip_rows, flip_cols, (rows, cols), pad, size)


def orient(vol: np.ndarray, t: SliceTransform) -> np.ndarray:
    """(n, rows, cols) on the scanner grid -> canonical view."""
    if t.transpose:
        vol = vol.transpose(0, 2, 1)
    if t.flip_rows:
        vol = vol[:, ::-1, :]
    if t.flip_cols:
        vol = vol[:, :, ::-1]
    return np.ascontiguousarray(vol)


def unorient(vol: np.ndarray, t: SliceTransform) -> np.ndarray:
    """Inverse of :func:`orient` (flips first, then the transpose)."""
    if t.flip_cols:
        vol = vol[:, :, ::-1]
    if t.flip_rows:
        vol = vol[:, ::-1, :]
    if t.transpose:
        vol = vol.transpose(0, 2, 1)
    return np.ascontiguousarray(vol)


def intensity_range(vol: np.ndarray, normalisation: dict) -> tuple[float, float]:
    """Volume-wide min–max bounds (robust upper percentile), from a subsample for speed on large series."""
    sample = vol[:, ::2, ::2].ravel() if vol.size > 4_000_000 else vol.ravel()
    lo_p = float(normalisation.get("lower_percentile", 0.0))
    hi_p = float(normalisation.get("upper_percentile", 100.0))
    lo = float(np.percentile(sample, lo_p)) if lo_p > 0 else float(sample.min())
    hi = float(np.percentile(sample, hi_p)) if hi_p < 100 else float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def to_model_input(slices: np.ndarray, lo: float, hi: float, t: SliceTransform, in_channels: int = 3,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(b, rows, cols) canonical slices -> (b, C, S, S) float tensor in [0, 1], grey copied to C channels."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(device)
    x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)
    top, bottom, left, right = t.pad
    x = F.pad(x[:, None], (left, right, top, bottom), value=0.0)
    if x.shape[-1] != t.size:
        x = F.interpolate(x, size=(t.size, t.size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > t.size)
    return x.expand(-1, in_channels, -1, -1).contiguous()


def labels_to_model_grid(labels: np.ndarray, t: SliceTransform) -> torch.Tensor:
    """(b, rows, cols) canonical label maps -> (b, S, S) int64 on the model grid (nearest, centre-aligned)."""
    y = torch.from_numpy(np.ascontiguousarray(labels)).float()[:, None]
    top, bottom, left, right = t.pad
    y = F.pad(y, (left, right, top, bottom), value=0.0)
    if y.shape[-1] != t.size:
        y = F.interpolate(y, size=(t.size, t.size), mode="nearest-exact")
    return y[:, 0].long()


def from_model_output(logits: torch.Tensor, t: SliceTransform) -> torch.Tensor:
    """(b, C, S, S) logits -> (b, C, rows, cols) on the canonical grid, the inverse of the input mapping."""
    p = t.padded
    if logits.shape[-1] != p:
        logits = F.interpolate(logits, size=(p, p), mode="bilinear", align_corners=False)
    top, _, left, _ = t.pad
    return logits[:, :, top:top + t.shape[0], left:left + t.shape[1]]


#: The body's bounding box is used only where it magnifies the image at least this much: a body filling 80 % of
#: the field of view or more is left as it is (the same input, the same result as before the box existed).
#: Smaller zooms are well inside training's zoom range, so they bring nothing but perturbation: at 1.13-1.20
#: the bundled model's weakest structure flipped both ways on the stand-in (water pelvis 0.17 -> 0.01, T1
#: fibula 0.67 -> 0.79) ...
MIN_MAGNIFICATION = 1.25
#: ... and at most this much, and never to less than MIN_BOX_MM across: one adult leg (150-180 mm) in a wide
#: field of view is not a small body, and magnified as one it lost its bones (Dice above 0.8 -> 0.64 in
#: tests/test_preprocessing.py); a four-year-old's hips and thighs are ~230 mm across with the margin
MAX_MAGNIFICATION = 2.5
MIN_BOX_MM = 250.0
#: A pixel is body where the series' mean slice exceeds this share of that image's 99th percentile (air,
#: with its noise, stays far below; ghosts and coil glow above it only widen the box, the safe direction)
BODY_THRESHOLD = 0.1


def body_box(vol: np.ndarray, pixel_spacing: tuple[float, float] | None) -> tuple[slice, slice] | None:
    """Rows and columns of the body in every slice of ``vol`` (n, rows, cols), with a margin, at least
    MIN_BOX_MM across (``pixel_spacing``: row, column spacing in mm); None where the body fills the field of
    view, or the pixel spacing is unknown.

    Why: the network sees each slice resized to a fixed input, so a body that fills half the field of view (a
    small child scanned with an adult's 45 cm) reaches it at half the size it learned bones at: on the
    real-shape stand-in's four-year-old the bundled model found no femur (Dice 0.14 on T1) and no fibula; on
    the body's box, 0.90 and 0.87; bodies that fill the field of view are not touched (docs/model.md,
    "Narrowed to the body"). One box for the whole series, so every slice keeps one scale and the neighbours
    the network is shown stay aligned. The predictor uses it only for a series that reaches the hips
    (``reaches_hips``): calves alone, magnified, show the tibia at a femur's size."""
    n, rows, cols = vol.shape
    if n == 0 or rows < 16 or cols < 16 or pixel_spacing is None or min(pixel_spacing) <= 0:
        return None
    step = max(1, n // 64)  # the mean of up to ~64 slices spread over the series: the body's extent, cheaply
    mean = vol[::step].mean(0, dtype=np.float32)
    top = float(np.percentile(mean, 99))
    if not np.isfinite(top) or top <= float(mean.min()):
        return None
    body = mean > float(mean.min()) + BODY_THRESHOLD * (top - float(mean.min()))
    r = np.flatnonzero(body.sum(1) > max(2, 0.01 * cols))  # rows with more than specks of body
    c = np.flatnonzero(body.sum(0) > max(2, 0.01 * rows))
    if not len(r) or not len(c):
        return None
    r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
    side = max(r1 - r0, c1 - c0)
    margin = int(0.08 * side) + 4
    r0, r1, c0, c1 = r0 - margin, r1 + margin, c0 - margin, c1 + margin
    least = max(rows, cols) / MAX_MAGNIFICATION  # widen a small box about its centre
    r0, r1 = _widen(r0, r1, int(np.ceil(max(least, MIN_BOX_MM / float(pixel_spacing[0])))))
    c0, c1 = _widen(c0, c1, int(np.ceil(max(least, MIN_BOX_MM / float(pixel_spacing[1])))))
    r0, r1, c0, c1 = max(0, r0), min(rows, r1), max(0, c0), min(cols, c1)
    if max(rows, cols) < MIN_MAGNIFICATION * max(r1 - r0, c1 - c0):
        return None
    return slice(r0, r1), slice(c0, c1)


def _widen(lo: int, hi: int, least: int) -> tuple[int, int]:
    extra = least - (hi - lo)
    return (lo - extra // 2, hi + extra - extra // 2) if extra > 0 else (lo, hi)


#: Pelvis voxels the whole-field prediction must hold for a series to count as reaching the hips (a few
#: specks of a model's confusion are not a pelvis)
HIPS_MIN_VOXELS = 500


def reaches_hips(labels: np.ndarray, table: Sequence[Label] = DEFAULT_LABELS) -> bool:
    """Whether a label map (a prediction, or training truth) shows a pelvis: the series reaches the hips."""
    pelvis = next((lab.value for lab in table if lab.name.upper() == "PELVIS"), None)
    return pelvis is not None and int(np.count_nonzero(labels == pelvis)) >= HIPS_MIN_VOXELS
