"""A received Segmentation object read onto the source series' grid, its segments matched to the model's
structures.

Why its own reader rather than the node's encoder in reverse: corrections come from other writers. OHIF
replaces every code by a generic "Tissue", renumbers the segments and drops empty ones; 3D Slicer (dcmqi)
keeps SNOMED codes with laterality; the newest OHIF saves a Label Map Segmentation (66.7), RLE Lossless
(../shared/REFERENCE.md §7). So segments are matched by the SNOMED code of their segmented property type
first and, failing that, by the words of their label and description; the left and right segments of one
bone merge into that bone's class (sides are measured later from patient coordinates, as the node splits
them: learn/scoring.py).

Frames are decoded by highdicom (bit-packed BINARY, FRACTIONAL, LABELMAP, RLE or not) and placed on the
source grid by the source instance each frame references (Derivation Image Sequence) or, for a writer that
leaves that out, by its plane position: the SEG must share the source's Frame of Reference, orientation,
pixel spacing and matrix, and each frame must lie on a source slice. Anything else is unusable, with the
reason in words (:class:`Unusable`), never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from inference.labels import DEFAULT_LABELS, Label
from storage.models import Instance

from ..slices import stack_blocks

SEG_BINARY = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_LABELMAP = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_CLASSES = (SEG_BINARY, SEG_LABELMAP)

#: SNOMED CT (and the older SNOMED RT) codes of segmented property types, per structure name. The node
#: writes the first of each (inference/labels.py); the others are what other tools write for the same bone.
CODES: dict[str, set[str]] = {
    "FEMUR": {"71341001", "T-12710"},
    "TIBIA": {"12611008", "T-12770"},
    "FIBULA": {"87342007", "T-12750"},
    # pelvis / bony pelvis and the hip bone (os coxae), which tools segment one side at a time
    "PELVIS": {"118645006", "12921003", "816092008", "29836001", "T-12340", "T-D6000"},
}
#: Words in a segment's label or description, per structure (matched as whole words, case-insensitive).
WORDS: dict[str, tuple[str, ...]] = {
    "FEMUR": ("femur", "femoral", "femora", "thigh bone"),
    "TIBIA": ("tibia", "tibial", "shin bone"),
    "FIBULA": ("fibula", "fibular"),
    "PELVIS": ("pelvis", "pelvic", "hip bone", "hip", "hips", "os coxae", "coxal", "innominate", "ilium",
               "iliac", "hipbone"),
}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in (text or "").split("\\") if v != ""]
    except ValueError:
        return []


class Unusable(Exception):
    """The SEG cannot be read onto the source grid; the message says why, in words."""


@dataclass
class SourceGrid:
    """The source series as the node stacks it: one slice per instance, in the order infer/compute.py uses."""

    sop_uids: list[str]
    origins: np.ndarray  # (n, 3) ImagePositionPatient per slice
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    cols: int
    frame_of_reference_uid: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.sop_uids), self.rows, self.cols

    @property
    def slice_spacing(self) -> float:
        if len(self.origins) < 2:
            return 1.0
        normal = np.cross(self.row_dir, self.col_dir)
        return float(np.median(np.abs(np.diff(self.origins @ normal))))


def source_grid(instances: Sequence[Instance]) -> SourceGrid:
    """The grid of a stored series, stacked as a job stacks it (blocks joined in order), or Unusable."""
    blocks, why = stack_blocks(list(instances))
    if blocks is None:
        raise Unusable(f"the source series does not stack into a volume: {why}")
    ordered = [i for block in blocks for i in block]
    if any((i.frames or 1) > 1 for i in ordered):
        raise Unusable("the source series is one multi-frame object: corrections are read for single-frame "
                       "series only")
    iop = _floats(ordered[0].orientation)
    ps = _floats(ordered[0].pixel_spacing)
    return SourceGrid([i.sop_uid for i in ordered], np.array([_floats(i.position) for i in ordered]),
                      tuple(iop[:3]), tuple(iop[3:]), (ps[0], ps[1]), int(ordered[0].rows or 0),  # type: ignore[arg-type]
                      int(ordered[0].columns or 0), ordered[0].frame_of_reference_uid)


@dataclass
class SegRead:
    """A SEG on the source grid: ``classes`` (slices × rows × cols, uint8, label values) in ``sop_uids``'
    order; ``matched`` / ``unmatched``: the segments in words ("1 'Left femur' → femur (label)")."""

    classes: np.ndarray
    sop_uids: list[str]
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    by_reference: int = 0  # frames placed by their referenced source instance
    by_position: int = 0   # frames placed by their plane position


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()).strip() + " "


def match_segment(item: Dataset, labels: Sequence[Label] = DEFAULT_LABELS) -> tuple[Label | None, str]:
    """The structure a SegmentSequence item stands for, and how that was found ("code" or "label"), or
    (None, why not). A code names one structure outright; words must name exactly one."""
    by_name = {lab.name: lab for lab in labels}
    for prop in item.get("SegmentedPropertyTypeCodeSequence", []) or []:
        code = str(prop.get("CodeValue", "") or "")
        for name, codes in CODES.items():
            if code in codes and name in by_name:
                return by_name[name], "code"
    texts = [str(item.get("SegmentLabel", "") or ""), str(item.get("SegmentDescription", "") or "")]
    texts += [str(c.get("CodeMeaning", "") or "") for c in item.get("SegmentedPropertyTypeCodeSequence", []) or []]
    for text in texts:
        w = _words(text)
        found = {name for name, terms in WORDS.items() if name in by_name and any(f" {t} " in w for t in terms)}
        if len(found) == 1:
            return by_name[found.pop()], "label"
        if len(found) > 1:
            return None, "names several structures"
    return None, "no known structure in its code or label"


def _frame_item(ds: Dataset, k: int, seq: str) -> Dataset | None:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and len(per) > k and getattr(per[k], seq, None):
        return getattr(per[k], seq)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) and getattr(shared[0], seq, None):
        return getattr(shared[0], seq)[0]
    return None


def _frame_references(ds: Dataset, k: int) -> list[str]:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) <= k:
        return []
    out = []
    for der in per[k].get("DerivationImageSequence", []) or []:
        for src in der.get("SourceImageSequence", []) or []:
            out.append(str(src.get("ReferencedSOPInstanceUID", "") or ""))
    return out


def _check_grid(ds: Dataset, grid: SourceGrid) -> None:
    if str(ds.get("FrameOfReferenceUID", "") or "") != grid.frame_of_reference_uid:
        raise Unusable("the SEG is in another Frame of Reference than the source series")
    if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (grid.rows, grid.cols):
        raise Unusable(f"different grid: the SEG has {ds.get('Rows')}×{ds.get('Columns')} pixels a frame, the "
                       f"source {grid.rows}×{grid.cols}")


def _frame_geometry_ok(ds: Dataset, k: int, grid: SourceGrid) -> str:
    ori = _frame_item(ds, k, "PlaneOrientationSequence")
    if ori is not None and "ImageOrientationPatient" in ori:
        iop = np.array([float(v) for v in ori.ImageOrientationPatient])
        if np.abs(iop - np.array([*grid.row_dir, *grid.col_dir])).max() > 1e-3:
            return "different grid: the SEG's orientation differs from the source series'"
    px = _frame_item(ds, k, "PixelMeasuresSequence")
    if px is not None and "PixelSpacing" in px:
        sp = np.array([float(v) for v in px.PixelSpacing])
        if np.abs(sp - np.array(grid.pixel_spacing)).max() > 1e-3 * max(grid.pixel_spacing) + 1e-4:
            return "different grid: the SEG's pixel spacing differs from the source series'"
    return ""


def _slice_of(ds: Dataset, k: int, grid: SourceGrid, index: dict[str, int]) -> tuple[int | None, str]:
    """The source slice of SEG frame ``k`` (0-based) and how it was found ("reference" / "position")."""
    for uid in _frame_references(ds, k):
        if uid in index:
            return index[uid], "reference"
    pos = _frame_item(ds, k, "PlanePositionSequence")
    if pos is None or "ImagePositionPatient" not in pos:
        return None, "a frame neither references a source image nor has a plane position"
    p = np.array([float(v) for v in pos.ImagePositionPatient])
    dist = np.linalg.norm(grid.origins - p, axis=1)
    best = int(np.argmin(dist))
    if dist[best] > 0.25 * min(min(grid.pixel_spacing), grid.slice_spacing):
        return None, "different grid: a frame lies on no slice of the source series"
    return best, "position"


def read_seg(source: str | Path | Dataset, grid: SourceGrid, labels: Sequence[Label] = DEFAULT_LABELS) -> SegRead:
    """The SEG (a file or a dataset) on ``grid``, or Unusable with the reason."""
    import highdicom as hd
    import pydicom

    try:
        ds = source if isinstance(source, Dataset) else pydicom.dcmread(source)
    except Exception as exc:
        raise Unusable(f"unreadable: not a DICOM file ({type(exc).__name__})") from None
    if str(ds.get("SOPClassUID", "")) not in SEG_CLASSES:
        raise Unusable("not a Segmentation object (SOP class neither 66.4 nor 66.7)")
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:
        raise Unusable(f"unreadable Segmentation object ({type(exc).__name__}: {str(exc)[:160]})") from None
    _check_grid(ds, grid)
    seg_type = str(ds.get("SegmentationType", "") or "").upper()
    value_of: dict[int, int] = {}
    out = SegRead(np.zeros(grid.shape, dtype=np.uint8), list(grid.sop_uids))
    for item in ds.get("SegmentSequence", []) or []:
        number = int(item.get("SegmentNumber", 0) or 0)
        words = f"{number} '{str(item.get('SegmentLabel', '') or '')[:64]}'"
        if seg_type == "LABELMAP" and number == 0:
            continue  # the background segment of a label map
        lab, how = match_segment(item, labels)
        if lab is None:
            out.unmatched.append(f"{words}: {how}")
        else:
            value_of[number] = lab.value
            out.matched.append(f"{words} → {lab.name.lower()} ({how})")
    if not value_of:
        raise Unusable("no segment matched femur, tibia, fibula or pelvis"
                       + (f" (segments: {'; '.join(out.unmatched)})" if out.unmatched else " (no segments)"))
    index = {uid: k for k, uid in enumerate(grid.sop_uids)}
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    max_frac = float(ds.get("MaximumFractionalValue", 255) or 255)
    for k in range(n_frames):
        bad = _frame_geometry_ok(ds, k, grid)
        if bad:
            raise Unusable(bad)
        z, how = _slice_of(ds, k, grid, index)
        if z is None:
            raise Unusable(how)
        if how == "reference":
            out.by_reference += 1
        else:
            out.by_position += 1
        try:
            frame = np.asarray(seg.get_stored_frame(k + 1))
        except Exception as exc:
            raise Unusable(f"unreadable pixel data ({type(exc).__name__})") from None
        if frame.shape != (grid.rows, grid.cols):
            raise Unusable("different grid: a frame's size differs from the source series'")
        if seg_type == "LABELMAP":
            for number, value in value_of.items():
                out.classes[z][frame == number] = value
            continue
        ident = _frame_item(ds, k, "SegmentIdentificationSequence")
        number = int(ident.get("ReferencedSegmentNumber", 0) or 0) if ident is not None else 0
        if number not in value_of:
            continue
        mask = frame >= 0.5 * max_frac if seg_type == "FRACTIONAL" else frame > 0
        out.classes[z][mask] = value_of[number]
    return out
