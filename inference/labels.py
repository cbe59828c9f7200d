"""The label table shared by the phantoms, training, the model card and the DICOM SEG encoder.

One table, so that the value a model predicts, the folder a site's masks live in and the SNOMED CT code
written into the SEG can never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Label:
    """One segmented structure: its integer value in label maps and its coded meaning."""

    value: int
    name: str  # upper case, also the folder name of per-bone masks (published layout)
    snomed_code: str
    snomed_meaning: str
    rgb: tuple[int, int, int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rgb"] = list(self.rgb)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Label:
        return cls(
            value=int(d["value"]),
            name=str(d["name"]),
            snomed_code=str(d["snomed_code"]),
            snomed_meaning=str(d["snomed_meaning"]),
            rgb=tuple(int(c) for c in d["rgb"]),  # type: ignore[arg-type]
        )


#: Anatomical Structure (SCT 91723000) is the segmented property category of every label.
CATEGORY_CODE = ("91723000", "SCT", "Anatomical Structure")

#: Laterality modifiers (SCT) for later left/right splitting.
LEFT_CODE = ("7771000", "SCT", "Left")
RIGHT_CODE = ("24028007", "SCT", "Right")

DEFAULT_LABELS: tuple[Label, ...] = (
    Label(1, "FEMUR", "71341001", "Femur", (230, 159, 0)),
    Label(2, "TIBIA", "12611008", "Tibia", (86, 180, 233)),
    Label(3, "FIBULA", "87342007", "Fibula", (0, 158, 115)),
    Label(4, "PELVIS", "118645006", "Pelvis", (204, 121, 167)),
)
