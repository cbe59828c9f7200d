"""The studies, the radiologist's corrections and the independent scoring of issue 27's corrections bar.

Why a separate module: the bar (``bench/corrections_loop.py``) and the suite's small loop
(``tests/test_corrections_loop.py``) need the same three things, each written apart from the node's own code so
that they check it rather than repeat it:

* **studies** of a family the bundled model v0.2.0 does badly on and was never trained on: the real-shape
  stand-in's renderer (``bench.standin_realshape``: bones of the paediatric shape model at seeds 900000 + i that
  the training generator refuses, its own tissue layout and spin-echo signal model), rendered on a bounded grid
  so that a whole loop fits on 2 cores (288 × 288 at 1.5 mm, at most 72 slices from the iliac crest to below
  the ankle, each slice the mean of five planes);
* **corrections** made from the truth as viewers save them: a new series in the same study that references the
  source images, either as OHIF does (highdicom; every code replaced by the generic "Tissue", labels "Femur",
  "Tibia"..., segments renumbered, empty ones dropped, MANUAL) or as 3D Slicer does (dcmqi's
  ``itkimage2segimage``; the loaded SEG's per-side labels, SNOMED codes and AUTOMATIC algorithm type kept,
  creator "Slicer");
* **scoring** of a SEG read with pydicom and numpy only (frames placed by their referenced source instance, or
  by plane position when a writer leaves the reference out), never with the node's reader or highdicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from inference.phantom import Phantom

#: class values of the phantoms' label maps and of the model card, with the words a segment label may use
STRUCTURES = {"femur": 1, "tibia": 2, "fibula": 3, "pelvis": 4}
SNOMED = {"femur": ("71341001", "Femur"), "tibia": ("12611008", "Tibia"), "fibula": ("87342007", "Fibula"),
          "pelvis": ("118645006", "Pelvis")}
LABEL_WORDS = {"femur": "femur", "tibia": "tibia", "fibula": "fibula", "pelvis": "pelvis", "hip": "pelvis",
               "ilium": "pelvis", "pelvic": "pelvis"}
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


# ------------------------------------------------------------------------------------------------ studies
def make_study(index: int, contrast: str = "t1", size: int = 288, pixel: float = 1.5, max_slices: int = 72,
               sub: int = 5, slice_range: tuple[float, float] = (5.0, 10.0)) -> Phantom:
    """Shape ``index`` of the real-shape stand-in (6 and up: held-out random draws) on a bounded grid, from the
    iliac crest down: the slice step is the leg's length over ``max_slices`` within ``slice_range`` (mm); a leg
    too long for ``max_slices`` at the thickest slices loses its lower end (the ankle, then the calf)."""
    from bench import standin_realshape as sr
    from inference.synth import ssm

    models = {s: ssm.load(s) for s in ssm.SIDES}
    case = sr.make_skeleton(index, models)
    sk = case.skeleton
    z_top = float(max(v[:, 2].max() for v in sk.hips.values())) + 3
    z_bot = float(min(leg.ankle_centre[2] for leg in sk.legs.values())) - 10
    slice_mm = float(np.clip((z_top - z_bot) / max_slices, *slice_range))
    ph = sr.render_case(case, (contrast,), size=size, pixel=pixel, slice_mm=slice_mm, sub=sub)[contrast]
    n = min(max_slices, ph.geometry.n_slices)
    return Phantom(anatomy=None, geometry=replace(ph.geometry, n_slices=n),  # type: ignore[arg-type]
                   image=np.ascontiguousarray(ph.image[:n]), labels=np.ascontiguousarray(ph.labels[:n]))


def small_study(index: int) -> Phantom:
    """A small study of the same family for the suite: hips and thighs, 128 × 128 at 3.4 mm, 24 slices of 10 mm
    from the iliac crest down (the pelvis, the femora, the knee of a small child), three planes a slice."""
    return make_study(index, size=128, pixel=3.4, max_slices=24, sub=3, slice_range=(10.0, 10.0))


# ------------------------------------------------------------------------------------------------ scoring
def structure_of_label(label: str) -> str | None:
    """The structure a segment label names ("Right femur", "Femur", "Left hip bone" ...), or None."""
    for word in label.lower().replace("_", " ").split():
        if word in LABEL_WORDS:
            return LABEL_WORDS[word]
    return None


def _structure_of_segment(item: Dataset) -> str | None:
    by_label = structure_of_label(str(item.get("SegmentLabel", "")))
    if by_label:
        return by_label
    codes = item.get("SegmentedPropertyTypeCodeSequence") or []
    code = str(codes[0].CodeValue) if codes else ""
    return next((s for s, (c, _) in SNOMED.items() if c == code), None)


def read_seg(ds: Dataset, source: Sequence[Dataset]) -> np.ndarray:
    """The SEG ``ds`` as a class map (len(source), rows, cols) in ``source``'s order; pydicom and numpy only."""
    by_uid = {str(d.SOPInstanceUID): k for k, d in enumerate(source)}
    normal = np.cross(*np.array(source[0].ImageOrientationPatient, float).reshape(2, 3))
    heights = np.array([float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in source])
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    structure = {int(item.SegmentNumber): _structure_of_segment(item) for item in ds.SegmentSequence}
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    out = np.zeros((len(source), rows, cols), np.uint8)
    labelmap = str(ds.SOPClassUID) == LABELMAP_SEG
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        k = None
        for deriv in group.get("DerivationImageSequence") or []:
            for src in deriv.get("SourceImageSequence") or []:
                k = by_uid.get(str(src.ReferencedSOPInstanceUID), k)
        if k is None:  # no usable reference: place the frame by its position along the normal
            pos = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
            k = int(np.argmin(np.abs(heights - float(np.dot(pos, normal)))))
        frame = frames[f]
        if labelmap:
            for number, name in structure.items():
                if name:
                    out[k][frame == number] = STRUCTURES[name]
        else:
            name = structure.get(int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
            if name:
                out[k][frame > 0] = STRUCTURES[name]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Dice per structure, both sides together; None where neither map has the structure."""
    out: dict[str, float | None] = {}
    for name, v in STRUCTURES.items():
        x, y = a == v, b == v
        total = int(x.sum() + y.sum())
        out[name] = round(2.0 * float((x & y).sum()) / total, 4) if total else None
    return out


# ------------------------------------------------------------------------------------------------ corrections
def _sides(classes: np.ndarray, source: Sequence[Dataset]) -> np.ndarray:
    """+1 where a voxel lies on the patient's left (LPS x > 0), -1 on the right, per voxel of ``classes``."""
    ps = [float(v) for v in source[0].PixelSpacing]
    iop = np.array(source[0].ImageOrientationPatient, float).reshape(2, 3)
    cols = np.arange(classes.shape[2]) * ps[1]
    rows = np.arange(classes.shape[1]) * ps[0]
    xs = np.stack([float(d.ImagePositionPatient[0]) + iop[0, 0] * cols[None, :] + iop[1, 0] * rows[:, None]
                   for d in source])
    return np.where(xs > 0, 1, -1).astype(np.int8)


def ohif_seg(source: Sequence[Dataset], classes: np.ndarray, series_number: int = 99) -> Dataset:
    """A correction as OHIF v3 stores it (REFERENCE.md §7.2): a new series in the study, codes "Tissue", labels
    "Femur"..., segments renumbered 1..n with empty ones dropped, MANUAL, manufacturer "Unspecified"."""
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept

    tissue = CodedConcept("T-D0050", "SRT", "Tissue")
    present = [name for name, v in STRUCTURES.items() if (classes == v).any()]
    segs = np.zeros(classes.shape, np.uint8)
    descriptions = []
    for number, name in enumerate(present, start=1):
        segs[classes == STRUCTURES[name]] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name.capitalize(), segmented_property_category=tissue,
            segmented_property_type=tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=segs, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Unspecified",
        manufacturer_model_name="OHIF Viewer", software_versions="3.9", device_serial_number="1",
        series_description="Research Derived Series", content_label="SEGMENTATION", omit_empty_frames=True)
    seg.ImageComments = "NOT FOR CLINICAL USE"
    return seg


def dcmqi_exe() -> str:
    exe = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
    if not Path(exe).exists():
        raise FileNotFoundError("itkimage2segimage missing: install the dcmqi wheel (the test extras)")
    return exe


def slicer_seg(source_paths: Sequence[Path], source: Sequence[Dataset], classes: np.ndarray, out: Path,
               series_description: str = "Segmentation", algorithm_name: str = "dicom-node") -> Path:
    """A correction as 3D Slicer exports an edited AI SEG (REFERENCE.md §7.3): dcmqi's ``itkimage2segimage``, one
    labelmap image, per-side segments "Right femur"... with SNOMED codes and laterality, AlgorithmType AUTOMATIC
    carried over from the loaded SEG, ContentCreatorName "Slicer", SeriesNumber 100."""
    import SimpleITK as sitk

    work = out.parent / (out.stem + "-dcmqi")
    work.mkdir(parents=True, exist_ok=True)
    side = _sides(classes, source)
    lab = np.zeros(classes.shape, np.uint16)
    attributes = []
    label_id = 0
    for name, v in STRUCTURES.items():
        for s, word, code in ((-1, "Right", ("24028007", "Right")), (1, "Left", ("7771000", "Left"))):
            mask = (classes == v) & (side == s)
            if not mask.any():
                continue
            label_id += 1
            lab[mask] = label_id
            attributes.append({
                "labelID": label_id, "SegmentLabel": f"{word} {name}", "SegmentDescription": "Anatomical Structure",
                "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": algorithm_name,
                "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT",
                                                          "CodeMeaning": "Anatomical Structure"},
                "SegmentedPropertyTypeCodeSequence": {"CodeValue": SNOMED[name][0], "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": SNOMED[name][1]},
                "SegmentedPropertyTypeModifierCodeSequence": {"CodeValue": code[0], "CodingSchemeDesignator": "SCT",
                                                              "CodeMeaning": code[1]},
                "recommendedDisplayRGBValue": [200, 120, (60 + 40 * label_id) % 256],
            })
    # the label image on the source grid as ITK reads the series (slices sorted along the normal)
    normal = np.cross(*np.array(source[0].ImageOrientationPatient, float).reshape(2, 3))
    order = np.argsort([float(np.dot(np.array(d.ImagePositionPatient, float), normal)) for d in source])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(source_paths[i]) for i in order])
    ref = reader.Execute()
    img = sitk.GetImageFromArray(lab[order])
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(work / "labels.nrrd"), useCompression=True)
    meta = {"ContentCreatorName": "Slicer", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "ClinicalTrialCoordinatingCenterName": "QIICR", "SeriesDescription": series_description,
            "SeriesNumber": "100", "InstanceNumber": "1", "BodyPartExamined": "LEG",
            "segmentAttributes": [attributes], "ContentLabel": "SEGMENTATION",
            "ContentDescription": "Image segmentation"}
    (work / "meta.json").write_text(json.dumps(meta))
    r = subprocess.run([dcmqi_exe(), "--inputImageList", str(work / "labels.nrrd"), "--inputMetadata",
                        str(work / "meta.json"), "--inputDICOMList", ",".join(str(p) for p in source_paths),
                        "--outputDICOM", str(out), "--skip", "1"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"itkimage2segimage failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    shutil.rmtree(work, ignore_errors=True)
    return out
