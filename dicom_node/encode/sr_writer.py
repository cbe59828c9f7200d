"""The measurements report: a Comprehensive 3D SR (TID 1500) with the volume of each segment.

Each volume references its SEG segment and the source series, and the SR's evidence lists the SEG and the
source images, so a viewer (or a downstream system) can tie every number to the region it measures.

Each segment has two measurement groups with one tracking identifier (same UID, so readers merge them):
- TID 1411 (volumetric): the volume, referencing the SEG segment and its source series: what 3D Slicer's
  QuantitativeReporting and dcmqi read, and what defines the number;
- TID 1410 (planar): an image region, the outline of the structure on its centre slice (see key_slice.py):
  what OHIF 3.x measurement tracking and Weasis need to place a finding on an image. Without it OHIF skips
  every group and 3.13 blanks the viewer when the SR is opened. highdicom allows one kind of region
  reference per group, hence two groups rather than one.

For IHE AI Results (AIR): the observer is the algorithm as a device (Device UID from the model card), the
Contributing Equipment item names it, Procedure Reported names the imaging procedure, and the report is
UNVERIFIED (no person has checked it).
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.labels import CATEGORY_CODE
from inference.model_card import ModelCard
from inference.postprocess import label_boxes

from ..infer.segments import Segment
from .equipment import algorithm_equipment, model_name, procedure_reported
from .key_slice import key_slice

VOLUME = CodedConcept("118565006", "SCT", "Volume")
CM3 = CodedConcept("cm3", "UCUM", "cubic centimeter")
#: The quality gate's result per structure, as a TID 1500 qualitative evaluation. No standard code says
#: "automatic quality check" yet, so these are private codes (a "99" coding scheme, as DICOM PS3.16 allows).
QC_CHECK = CodedConcept("QC-GATE", "99DSN", "Automatic quality check of the segmentation")
QC_FAILED = CodedConcept("QC-FAIL", "99DSN", "Failed: anatomically implausible or model unsure; review it")
QC_PASSED = CodedConcept("QC-PASS", "99DSN", "Passed")


def short_name(sg: Segment) -> str:
    """"tibia L", "pelvis": how the quality gate names a structure in descriptions."""
    return sg.label.name.lower() + (f" {sg.side}" if sg.side else "")


def build_sr(seg: Dataset, source: list[Dataset], segments: list[Segment], volumes_cm3: dict[str, float],
             card: ModelCard, *, labels: np.ndarray, series_number: int, manufacturer: str,
             failed: set[str] | None = None) -> Dataset:
    """The TID 1500 report for ``segments`` of ``seg``; ``labels`` is the SEG's label map (n, rows, cols) in
    the order of ``source`` (values = segment numbers), from which each segment's key slice is taken.
    ``failed`` (the quality gate failed these structures, short names as :func:`short_name`): each volumetric
    measurement group then carries the check's result as a qualitative evaluation, and the series
    description says the checks failed."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=card.device_uid, name=card.name[:64], manufacturer_name=manufacturer[:64],
            model_name=model_name(card)),
    )
    context = hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)
    algo = hd.sr.AlgorithmIdentification(name=card.name[:64], version=card.version[:64])
    groups: list = []
    boxes = label_boxes(labels)
    for sg in segments:
        site = CodedConcept(sg.label.snomed_code, "SCT", sg.label.snomed_meaning)
        modifier = CodedConcept(*sg.modifier) if sg.modifier else None
        common: dict[str, Any] = dict(  # the arguments both kinds of measurement group share
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=sg.display_name[:64]),
            finding_type=site,
            finding_category=CodedConcept(*CATEGORY_CODE),
            algorithm_id=algo,
            finding_sites=[hd.sr.FindingSite(site, laterality=modifier)],
        )
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            # by SEG instance, segment number and source series: valid for BINARY and LABELMAP SEGs alike
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=sg.number,
                source_series=hd.sr.SourceSeriesForSegmentation(source[0].SeriesInstanceUID)),
            measurements=[hd.sr.Measurement(name=VOLUME, value=round(volumes_cm3.get(sg.name, 0.0), 3), unit=CM3,
                                            algorithm_id=algo)],
            **common,
            qualitative_evaluations=None if failed is None else [hd.sr.QualitativeEvaluation(
                QC_CHECK, QC_FAILED if short_name(sg) in failed else QC_PASSED)],
        ))
        box = boxes.get(sg.number)
        key = key_slice(labels[box] == sg.number, box) if box is not None else None
        if key is not None:
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=key.outline,
                    source_image=_source_image(source, labels.shape[0], key.index)),
                **common,
            ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=procedure_reported(str(source[0].get("Modality", ""))),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *source],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_verified=False,  # VerificationFlag UNVERIFIED: an algorithm's result no person has checked
        contributing_equipment=[algorithm_equipment(card, manufacturer)],
    )
    sr.SeriesDescription = "AI bone volumes (automatic)"
    if failed:
        sr.SeriesDescription = ("QC FAILED " + ", ".join(sorted(failed)) + " - AI bone volumes")[:64]
    return sr


def _source_image(source: list[Dataset], n_frames: int, index: int) -> hd.sr.SourceImageForRegion:
    """The image of label slice ``index``: that single-frame instance, or that frame of a multi-frame one."""
    if len(source) == n_frames:
        return hd.sr.SourceImageForRegion(source[index].SOPClassUID, source[index].SOPInstanceUID)
    return hd.sr.SourceImageForRegion(source[0].SOPClassUID, source[0].SOPInstanceUID,
                                      referenced_frame_numbers=[index + 1])
