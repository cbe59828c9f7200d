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


def build_sr(seg: Dataset, source: list[Dataset], segments: list[Segment], volumes_cm3: dict[str, float],
             card: ModelCard, *, series_number: int, manufacturer: str) -> Dataset:
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
    return sr
