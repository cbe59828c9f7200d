"""The last check before anything leaves the node: re-read each result and compare it with its source.

A SEG that a viewer silently ignores or draws shifted is worse than none, so a result whose study, frame of
reference, matrix, spacing, orientation or source references do not match the source series is refused
and the job fails with the reason (it is not retried: the same input would give the same result).
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class InvalidResult(ValueError):
    """The result does not match its source; the message says how."""


def _f(v) -> list[float]:
    return [float(x) for x in v]


def check_seg(path: str, source: list[Dataset]) -> Dataset:
    """Refuse (:class:`InvalidResult`) a written SEG that does not match its source; returns its header as read
    back (everything checked here is in the header: the pixel data is not read)."""
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    src = source[0]
    problems = []
    if seg.SOPClassUID not in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"):
        problems.append(f"SOP class {seg.SOPClassUID} is not a Segmentation")
    if seg.StudyInstanceUID != src.StudyInstanceUID:
        problems.append("different Study Instance UID")
    if seg.FrameOfReferenceUID != src.FrameOfReferenceUID:
        problems.append("different Frame of Reference")
    if (seg.Rows, seg.Columns) != (src.Rows, src.Columns):
        problems.append(f"matrix {seg.Rows}x{seg.Columns} vs source {src.Rows}x{src.Columns}")
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = _f(shared.PixelMeasuresSequence[0].PixelSpacing) if "PixelMeasuresSequence" in shared else None
    src_spacing = _f(src.PixelSpacing) if "PixelSpacing" in src else _f(
        src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    if spacing is not None and not np.allclose(spacing, src_spacing, atol=1e-4):
        problems.append(f"pixel spacing {spacing} vs source {src_spacing}")
    if "PlaneOrientationSequence" in shared:
        iop = _f(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
        src_iop = _f(src.ImageOrientationPatient) if "ImageOrientationPatient" in src else _f(
            src.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)
        if not np.allclose(iop, src_iop, atol=1e-4):
            problems.append("orientation differs from the source")
    if "ReferencedSeriesSequence" not in seg:
        problems.append("no ReferencedSeriesSequence")
    else:
        referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                      for i in s.ReferencedInstanceSequence}
        source_uids = {d.SOPInstanceUID for d in source}
        if not referenced <= source_uids:
            problems.append("references instances outside the source series")
        for k, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            try:
                uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            except (AttributeError, IndexError):
                problems.append(f"frame {k + 1} has no source image reference")
                break
            if uid not in source_uids:
                problems.append(f"frame {k + 1} references an unknown instance")
                break
    if problems:
        raise InvalidResult("SEG refused: " + "; ".join(problems))
    return seg


def check_sr(path: str, seg: Dataset, source: list[Dataset]) -> None:
    """Refuse a written SR whose study or evidence does not match; ``seg``: the SEG's header as
    :func:`check_seg` read it back from its file."""
    sr = pydicom.dcmread(path)
    evidence = {i.ReferencedSOPInstanceUID for s in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    problems = []
    if sr.StudyInstanceUID != source[0].StudyInstanceUID:
        problems.append("different Study Instance UID")
    if seg.SOPInstanceUID not in evidence:
        problems.append("the SEG is not in its evidence")
    if not {d.SOPInstanceUID for d in source} <= evidence:
        problems.append("source images missing from its evidence")
    if problems:
        raise InvalidResult("SR refused: " + "; ".join(problems))
