"""Encoding a label map as a DICOM SEG that viewers display (see ../shared/REFERENCE.md §2).

BINARY, uncompressed; same rows/columns/spacing/orientation and Frame of Reference as the source; every
frame references its source instance; each segment has a SNOMED CT code, a colour and the algorithm's
name and version; a new series in the source study whose description says it is automatic; the
algorithm as Contributing Equipment (IHE AI Results, see equipment.py).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.labels import CATEGORY_CODE
from inference.model_card import ModelCard

from ..infer.segments import Segment
from .equipment import algorithm_equipment, model_name, software_versions

LOWER_LIMB = ("61685007", "SCT", "Lower limb")


def rgb_to_cielab(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """sRGB (0-255) to CIE L*a*b* (D65), the colour space DICOM's RecommendedDisplayCIELabValue uses."""
    c = np.asarray(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L, a, b = 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return hd.color.CIELabColor(float(np.clip(L, 0, 100)), float(np.clip(a, -128, 127)), float(np.clip(b, -128, 127)))


def build_seg(source: list[Dataset], seg_labels: np.ndarray, segments: list[Segment], card: ModelCard, *,
              series_description: str, series_number: int, manufacturer: str,
              segmentation_type: str = "BINARY") -> Dataset | None:
    """The SEG for ``seg_labels`` (n, rows, cols; values = segment numbers) over ``source`` (same order).

    None when no structure was found. ``segmentation_type`` is BINARY (every viewer) or LABELMAP (recent
    OHIF only). Laterality goes into SegmentedPropertyTypeModifierCodeSequence, which highdicom's
    SegmentDescription has no argument for, so it is set after construction.
    """
    if not segments:
        return None
    algo = hd.AlgorithmIdentificationSequence(
        name=card.name[:64], family=codes.cid7162.ArtificialIntelligence, version=card.version[:64],
    )
    descriptions = [hd.seg.SegmentDescription(
        segment_number=sg.number,
        segment_label=sg.display_name.capitalize()[:64],
        segmented_property_category=CodedConcept(*CATEGORY_CODE),
        segmented_property_type=CodedConcept(sg.label.snomed_code, "SCT", sg.label.snomed_meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
        display_color=rgb_to_cielab(_side_colour(sg)),
    ) for sg in segments]
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=seg_labels,
        segmentation_type=getattr(hd.seg.SegmentationTypeValues, segmentation_type),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name(card),
        software_versions=software_versions(card),  # type: ignore[arg-type]  # stub says tuple[str]; takes any sequence
        device_serial_number="0",
        content_label="BONES",
        content_description="Automatic segmentation of femur, tibia, fibula and pelvis",
        omit_empty_frames=True,
        # IHE AIR: the algorithm as Contributing Equipment (Processing Algorithm, Device UID of the model)
        contributing_equipment=[algorithm_equipment(card, manufacturer)],
    )
    for item, sg in zip(seg.SegmentSequence, segments):
        if sg.modifier:
            prop = item.SegmentedPropertyTypeCodeSequence[0]
            prop.SegmentedPropertyTypeModifierCodeSequence = [CodedConcept(*sg.modifier)]
    seg.SeriesDescription = series_description[:64]
    anatomy = _frame_anatomy(source[0], segments)
    if anatomy is not None:
        seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    return seg


def _frame_anatomy(src: Dataset, segments: list[Segment]) -> Dataset | None:
    """Lower limb, with the side the segments are on (R, L or B), for every frame.

    A leg is a paired body part, so the laterality must be stated somewhere: General Series Laterality
    has no "both" and dciodvfy refuses it in a SEG, while Pixelmed requires it unless a Frame Laterality is
    present; Frame Laterality (with B for both legs) satisfies both. None when the side is not known (one
    leg, no pelvis, no declared laterality): nothing true could be written.
    """
    declared = str(src.get("Laterality", "") or src.get("ImageLaterality", "") or "").upper()
    sides = {sg.side for sg in segments if sg.side}
    side = declared if declared in ("R", "L") else ("B" if len(sides) == 2 else next(iter(sides), ""))
    if not side:
        return None
    item = Dataset()
    item.AnatomicRegionSequence = [CodedConcept(*LOWER_LIMB)]
    item.FrameLaterality = side
    return item


def _side_colour(sg: Segment) -> tuple[int, int, int]:
    """Left a little lighter than right, so the two sides of one bone can be told apart."""
    if sg.side != "L":
        return sg.label.rgb
    return tuple(int(c + (255 - c) * 0.35) for c in sg.label.rgb)  # type: ignore[return-value]
