"""The measurements report: a Comprehensive 3D SR (TID 1500) with the volume of each segment.

Each volume references its SEG segment and the source series, and the SR's evidence lists the SEG and the
source images, so a viewer (or a downstream system) can tie every number to the region it measures.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.labels import CATEGORY_CODE
from inference.model_card import ModelCard

from .. import __version__
from ..infer.segments import Segment

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
             card: ModelCard, *, series_number: int, manufacturer: str, failed: set[str] | None = None) -> Dataset:
    """The TID 1500 report. ``failed`` (the quality gate failed these structures, short names as
    :func:`short_name`): each measurement group then carries the check's result as a qualitative
    evaluation, and the series description says the checks failed."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"dicom-seg-node {__version__}", model_name=f"{card.name} {card.version}"[:64]),
    )
    context = hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)
    algo = hd.sr.AlgorithmIdentification(name=card.name[:64], version=card.version[:64])
    groups = []
    for sg in segments:
        site = CodedConcept(sg.label.snomed_code, "SCT", sg.label.snomed_meaning)
        modifier = CodedConcept(*sg.modifier) if sg.modifier else None
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=sg.display_name[:64]),
            # by SEG instance, segment number and source series: valid for BINARY and LABELMAP SEGs alike
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=sg.number,
                source_series=hd.sr.SourceSeriesForSegmentation(source[0].SeriesInstanceUID)),
            finding_type=site,
            finding_category=CodedConcept(*CATEGORY_CODE),
            algorithm_id=algo,
            finding_sites=[hd.sr.FindingSite(site, laterality=modifier)],
            measurements=[hd.sr.Measurement(name=VOLUME, value=round(volumes_cm3.get(sg.name, 0.0), 3), unit=CM3,
                                            algorithm_id=algo)],
            qualitative_evaluations=None if failed is None else [hd.sr.QualitativeEvaluation(
                QC_CHECK, QC_FAILED if short_name(sg) in failed else QC_PASSED)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=CodedConcept("241620005", "SCT", "Magnetic resonance imaging of lower limb"),
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
    )
    sr.SeriesDescription = "AI bone volumes (automatic)"
    if failed:
        sr.SeriesDescription = ("QC FAILED " + ", ".join(sorted(failed)) + " - AI bone volumes")[:64]
    return sr
