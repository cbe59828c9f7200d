"""Loading a stored series as a volume in patient geometry.

Single-frame slices come already ordered along the slice normal (see :func:`dicom_node.decide.rules.stack`); a
multi-frame instance (Enhanced or Legacy Converted Enhanced MR) is ordered here from its per-frame plane
positions. Pixels are decoded (compressed syntaxes through the pylibjpeg plugins) into one float32 array;
the metadata-only datasets that the SEG encoder needs are kept alongside, with the frame order, so labels
can be handed back in the source's own frame order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.postprocess import label_boxes
from storage.models import Instance

log = logging.getLogger("dicom_node.infer.volume")


@dataclass
class SeriesVolume:
    array: np.ndarray  # (n, rows, cols) float32, slices in stacking order
    datasets: list[Dataset]  # metadata only (no pixel data), same order
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_spacing: float
    origins: np.ndarray  # (n, 3) ImagePositionPatient of each slice, stacking order
    frame_order: np.ndarray | None = None  # multi-frame: source frame index of each stacked slice
    blocks: list[tuple[int, int, float]] | None = None  # joined blocks: (first, end, voxel mm³) per block

    def to_source_order(self, labels: np.ndarray) -> np.ndarray:
        """Labels in stacking order -> the order the SEG encoder expects (the source's frames)."""
        if self.frame_order is None:
            return labels
        out = np.empty_like(labels)
        out[self.frame_order] = labels
        return out

    @property
    def voxel_mm3(self) -> float:
        return float(self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing)

    def volumes_cm3(self, labels: np.ndarray, n_labels: int) -> np.ndarray:
        """Volume of each label value 0..n_labels-1 in cm³, each block with its own slice spacing."""
        parts = self.blocks or [(0, labels.shape[0], self.voxel_mm3)]
        per_slice = slice_counts(labels, n_labels)
        total = np.zeros(n_labels)
        for first, end, mm3 in parts:
            total += per_slice[first:end].sum(axis=0) * mm3
        return total / 1000.0

    @classmethod
    def join(cls, parts: list[SeriesVolume]) -> SeriesVolume:
        """Blocks of one series with gaps between them (single-frame slices), as one stack for the SEG."""
        if len(parts) == 1:
            return parts[0]
        blocks, at = [], 0
        for v in parts:
            blocks.append((at, at + v.array.shape[0], v.voxel_mm3))
            at += v.array.shape[0]
        first = parts[0]
        return cls(np.concatenate([v.array for v in parts]), [d for v in parts for d in v.datasets], first.row_dir,
                   first.col_dir, first.pixel_spacing, float(np.median([v.slice_spacing for v in parts])),
                   np.concatenate([v.origins for v in parts]), None, blocks)


def slice_counts(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxels of each label value 0..n_labels-1 per slice, (n, n_labels) int64, counted inside each value's
    bounding box (a whole-leg volume is mostly background, which is what is left)."""
    boxes = label_boxes(labels)
    counts = np.zeros((labels.shape[0], max([n_labels, *boxes]) + 1), dtype=np.int64)
    for value, box in boxes.items():
        counts[box[0], value] = (labels[box] == value).sum(axis=(1, 2))
    counts[:, 0] = labels.shape[1] * labels.shape[2] - counts[:, 1:].sum(axis=1)
    return counts[:, :n_labels]


class NotStackable(ValueError):
    """The frames do not form one volume; the message says why."""


def load_series(instances: list[Instance], locate: Callable[[str], str | Path] | None = None) -> SeriesVolume:
    """The instances' pixels as one volume; ``locate`` turns a stored path into its file (default: as is)."""
    where = locate or (lambda stored: stored)
    if len(instances) == 1 and (instances[0].frames or 1) > 1:
        return load_multiframe(str(where(instances[0].path)))
    datasets: list[Dataset] = []
    array = None
    inverted: list[int] = []
    for k, inst in enumerate(instances):
        ds = pydicom.dcmread(where(inst.path))
        check_pixels(ds)
        px = decoded_pixels(ds, f"instance {getattr(inst, 'instance_number', None) or k + 1}").astype(np.float32)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            inverted.append(k)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            px = px * slope + intercept
        if array is None:
            array = np.empty((len(instances),) + px.shape, dtype=np.float32)
        array[k] = px
        del ds.PixelData
        datasets.append(ds)
    assert array is not None
    invert_monochrome1(array, inverted)
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    ps = tuple(float(v) for v in datasets[0].PixelSpacing)
    if len(datasets) > 1:
        normal = np.cross(iop[:3], iop[3:])
        p0 = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
        p1 = np.asarray([float(v) for v in datasets[-1].ImagePositionPatient])
        spacing = abs(float(np.dot(p1 - p0, normal))) / (len(datasets) - 1)
    else:
        spacing = float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    return SeriesVolume(array, datasets, tuple(iop[:3]), tuple(iop[3:]), ps, spacing, origins)  # type: ignore[arg-type]


def check_pixels(ds: Dataset) -> None:
    """Refuse, in words, pixel data the grey-value model cannot read (before any inference is spent)."""
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if spp != 1 or (photometric and photometric not in ("MONOCHROME1", "MONOCHROME2")):
        raise NotStackable(f"colour images ({photometric or 'no PhotometricInterpretation'}, {spp} samples per "
                           "pixel): the model reads greyscale MR images only")
    if "PixelData" not in ds:
        raise NotStackable("an image of the series has no pixel data (float or double pixel data is not read)")


def decoded_pixels(ds: Dataset, which: str) -> np.ndarray:
    """``ds.pixel_array``, or the reason in words when it cannot be decoded (same input, same failure: the
    series is skipped rather than retried)."""
    try:
        return ds.pixel_array
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(ts, "name", "") or str(ts or "unknown transfer syntax")
        log.debug("pixel data of %s not decodable", which, exc_info=True)
        raise NotStackable(f"the pixel data of {which} could not be decoded ({name}): it is corrupt or no "
                           "installed decoder reads it") from exc


def invert_monochrome1(array: np.ndarray, slices: list[int]) -> None:
    """MONOCHROME1 shows high values dark: mirror those slices' values within the volume's range, so that
    the model sees what the radiologist sees (a MONOCHROME2 image of the same anatomy)."""
    if not slices:
        return
    lo, hi = float(array.min()), float(array.max())
    for k in slices:
        array[k] = (lo + hi) - array[k]


def _frame_attr(ds: Dataset, k: int, seq: str, item: str):
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and seq in per[k]:
        return getattr(per[k][seq][0], item)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and seq in shared[0]:
        return getattr(shared[0][seq][0], item)
    raise NotStackable(f"multi-frame instance without {seq}.{item}")


def load_multiframe(path: str) -> SeriesVolume:
    """An Enhanced/Legacy Converted Enhanced MR instance as a volume, frames sorted along the normal."""
    ds = pydicom.dcmread(path)
    check_pixels(ds)
    n = int(ds.NumberOfFrames)
    iops = np.array([[float(v) for v in _frame_attr(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")]
                     for k in range(n)])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise NotStackable("mixed orientations between frames")
    iop = iops[0]
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) < 0.8:
        raise NotStackable("sagittal or coronal frames: the model segments axial slices only")
    pos = np.array([[float(v) for v in _frame_attr(ds, k, "PlanePositionSequence", "ImagePositionPatient")]
                    for k in range(n)])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    gaps = np.diff(d[order])
    if len(gaps) and (gaps < 1e-3).any():
        raise NotStackable("frames share slice positions (several stacks or time points in one instance)")
    if len(gaps) and np.abs(gaps - np.median(gaps)).max() > 0.1 * np.median(gaps) + 0.01:
        raise NotStackable("inconsistent frame spacing")
    ps = tuple(float(v) for v in _frame_attr(ds, 0, "PixelMeasuresSequence", "PixelSpacing"))
    pixels = decoded_pixels(ds, "the multi-frame instance").astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]
    for k in range(n):  # Enhanced MR keeps the rescale in the functional groups, per frame or shared
        try:
            slope = float(_frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = float(_frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleIntercept"))
        except (NotStackable, AttributeError, TypeError, ValueError):
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            pixels[k] = pixels[k] * slope + intercept
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        invert_monochrome1(pixels, list(range(n)))
    del ds.PixelData
    _share_orientation(ds)
    spacing = (float(np.median(gaps)) if len(gaps)
               else float(_frame_attr(ds, 0, "PixelMeasuresSequence", "SliceThickness")))
    return SeriesVolume(pixels[order], [ds], tuple(iop[:3]), tuple(iop[3:]), ps, spacing, pos[order], order)  # type: ignore[arg-type]


def _share_orientation(ds: Dataset) -> None:
    """Move a per-frame PlaneOrientationSequence that is the same in every frame to the shared groups.

    Scanners' Enhanced MR often repeats the orientation in every frame; highdicom's Segmentation accepts a
    multi-frame source only with the orientation shared ("Source images must have a shared orientation").
    The frames were already checked to share one orientation; only this pixel-less metadata copy changes.
    """
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if not per or "PlaneOrientationSequence" not in per[0]:
        return
    from pydicom.sequence import Sequence

    orientation = per[0].PlaneOrientationSequence
    if "SharedFunctionalGroupsSequence" not in ds or not ds.SharedFunctionalGroupsSequence:
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = orientation
    for item in per:
        if "PlaneOrientationSequence" in item:
            del item.PlaneOrientationSequence
