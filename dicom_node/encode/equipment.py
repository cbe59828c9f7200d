"""Who made a result: the algorithm as IHE AI Results (AIR) asks a SEG and an SR to name it.

PACS and viewers that follow AIR show which algorithm, in which version, produced a result, and tell two
trainings of the same model apart by the Device UID, so the Contributing Equipment item carries the model
card's name and version and a Device UID derived from the checkpoint (:attr:`ModelCard.device_uid`).
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes

from inference.model_card import ModelCard

from .. import __version__

#: IHE AIR's Purpose of Reference for the algorithm that produced a result.
PROCESSING_ALGORITHM = CodedConcept("1630", "99IHE", "Processing Algorithm")
#: Procedure Reported (TID 1500 row 4) by the source modality, from CID 100 (Quantitative Diagnostic Imaging
#: Procedures), the codes the Pixelmed validator accepts there.
PROCEDURE_BY_MODALITY = {
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
}
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def model_name(card: ModelCard) -> str:
    """Manufacturer's Model Name of the algorithm: the card's name and version (LO, 64 characters)."""
    return f"{card.name} {card.version}"[:64]


def software_versions(card: ModelCard) -> list[str]:
    """The model's version and the node's, so a result says both what was run and what encoded it."""
    return [card.version[:64], f"dicom-seg-node {__version__}"]


def algorithm_equipment(card: ModelCard, manufacturer: str) -> hd.ContributingEquipment:
    """One Contributing Equipment Sequence item for the algorithm (AIR: Processing Algorithm)."""
    item = hd.ContributingEquipment(
        manufacturer=manufacturer[:64],
        # highdicom accepts only CID 7005's DCM codes here; AIR's 99IHE code replaces it below
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name(card),
        software_versions=software_versions(card),
        contribution_description=f"Automatic segmentation by {card.architecture}/{card.encoder}"[:64],
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = card.device_uid
    return item


def procedure_reported(modality: str) -> CodedConcept:
    """What TID 1500 names as the reported procedure: the imaging procedure of the source series."""
    return PROCEDURE_BY_MODALITY.get(modality.upper(), IMAGING_PROCEDURE)
