"""Corrected SEGs the way real viewers write them, for the tests of the corrections loop (issue 27).

Each writer takes the source series (the files the node segmented) and a class map aligned with them
(``classes[k]`` belongs to ``sources[k]``; values = the model card's label values, 0 background) and writes
one Segmentation object the way a radiologist's tool would save it (../shared/REFERENCE.md §7):

- :func:`ohif_seg` — OHIF v3 (dcmjs): a new series in the source study, every code replaced by SRT T-D0050
  "Tissue", segments renumbered 1..n with the empty ones dropped, labels in words ("Femur", "Left tibia"),
  Manufacturer "Unspecified", no Content Creator; BINARY (66.4) or, with ``labelmap=True``, the newer OHIF
  default: a Label Map Segmentation (66.7), RLE Lossless;
- :func:`dcmqi_seg` — 3D Slicer's export through dcmqi's ``itkimage2segimage`` (the real binary from the
  dcmqi wheel): one NRRD per segment, SNOMED codes with laterality modifiers, the loaded SEG's AUTOMATIC
  algorithm type kept, ContentCreatorName "Slicer";
- :func:`copy_as_new_instance` — a saved copy of a SEG (the node's own, typically) under a new SOP Instance
  UID, optionally in the same series (OHIF storing into an existing series).

:func:`phantom_classes` gives the phantom's truth aligned with the written files, the usual input.
The writers are test helpers, not product code: they live here so every helper's tests write the same SEGs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from inference.labels import CATEGORY_CODE, DEFAULT_LABELS, LEFT_CODE, RIGHT_CODE

_CODE_TO_VALUE = {lab.snomed_code: lab.value for lab in DEFAULT_LABELS}

#: OHIF's (dcmjs's) generic code for every segment's category and type
TISSUE = ("T-D0050", "SRT", "Tissue")
NAMES = {lab.value: lab.name.capitalize() for lab in DEFAULT_LABELS}  # 1 -> "Femur" ...
BY_VALUE = {lab.value: lab for lab in DEFAULT_LABELS}


def read_sources(paths: Sequence[Path]) -> list[Dataset]:
    """The source files' headers (pixels left out: the writers need geometry and UIDs only)."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def phantom_classes(ph, sources: Sequence[Dataset]) -> np.ndarray:
    """The phantom's truth (its label volume) aligned with ``sources`` (one slice per file, by position)."""
    g = ph.geometry
    k = [int(round((g.origin[2] - float(d.ImagePositionPatient[2])) / g.slice_thickness)) for d in sources]
    return ph.labels[k].astype(np.uint8)


def patient_x(sources: Sequence[Dataset], shape: tuple[int, int, int]) -> np.ndarray:
    """Patient x (LPS: + is the patient's left) of every voxel, (n, rows, cols)."""
    n, rows, cols = shape
    out = np.empty(shape, dtype=np.float32)
    r, c = np.mgrid[0:rows, 0:cols]
    for k, d in enumerate(sources):
        iop = [float(v) for v in d.ImageOrientationPatient]
        dr, dc = (float(v) for v in d.PixelSpacing)
        out[k] = float(d.ImagePositionPatient[0]) + c * dc * iop[0] + r * dr * iop[3]
    return out


def sided_masks(sources: Sequence[Dataset], classes: np.ndarray, sided: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(label words, mask) per present structure; the structures named in ``sided`` split into "Left …" and
    "Right …" at the midline between the bones (the mean patient x of every bone voxel), the rest whole."""
    x = patient_x(sources, classes.shape)
    bone = classes > 0
    mid = float(x[bone].mean()) if bone.any() else 0.0
    out = []
    for value, name in NAMES.items():
        mask = classes == value
        if not mask.any():
            continue  # OHIF drops empty segments
        if name.upper() in sided:
            for side, part in (("Right", mask & (x <= mid)), ("Left", mask & (x > mid))):
                if part.any():
                    out.append((f"{side} {name.lower()}", part))
        else:
            out.append((name, mask))
    return out


def ohif_seg(sources: Sequence[Dataset], classes: np.ndarray, out: Path, *, labelmap: bool = False,
             sided: Sequence[str] = ("TIBIA",), series_uid: str | None = None, series_number: int = 99,
             series_description: str = "Corrected bones",
             rename: Callable[[str], str] | None = None) -> Path:
    """A SEG as OHIF's "Store Segmentation" saves it (see the module docstring); ``rename`` changes the
    segment label words (e.g. to "Liver", a structure the node does not know)."""
    parts = sided_masks(sources, classes, sided)
    if not parts:
        raise ValueError("nothing to save: OHIF refuses an empty segmentation")
    n = len(parts)
    pixels = np.zeros(classes.shape, dtype=np.uint8)
    for number, (_, mask) in enumerate(parts, start=1):  # renumbered 1..n
        pixels[mask] = number
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=(rename(words) if rename else words)[:64],
        segmented_property_category=CodedConcept(*TISSUE),
        segmented_property_type=CodedConcept(*TISSUE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    ) for number, (words, _) in enumerate(parts, start=1)]
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels if labelmap or n == 1 else np.stack([pixels == i for i in range(1, n + 1)], -1)
        .astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Unspecified",
        manufacturer_model_name="OHIF Viewer",
        software_versions="3.9",
        device_serial_number="0",
        transfer_syntax_uid=RLELossless if labelmap else pydicom.uid.ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description[:64]
    seg.ImageComments = "NOT FOR CLINICAL USE"
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out, enforce_file_format=True)
    return out


def _dcmqi_exe() -> str:
    exe = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
    if not Path(exe).exists():
        raise RuntimeError("itkimage2segimage missing: install the test extras (the dcmqi wheel ships it)")
    return exe


def dcmqi_seg(source_paths: Sequence[Path], classes: np.ndarray, out: Path, workdir: Path, *,
              creator: str = "Slicer", algorithm_type: str = "AUTOMATIC") -> Path:
    """A SEG as 3D Slicer exports it: ``itkimage2segimage`` over the source files, one NRRD per segment,
    each bone split into left and right the way the node splits them (so the codes carry laterality), the
    algorithm type kept from the loaded SEG (AUTOMATIC by default) and "Slicer" as Content Creator."""
    import SimpleITK as sitk

    from dicom_node.infer.segments import split_sides

    sources = read_sources(source_paths)
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in sources])
    iop = [float(v) for v in sources[0].ImageOrientationPatient]
    spacing = tuple(float(v) for v in sources[0].PixelSpacing)
    sided, segments = split_sides(classes, list(DEFAULT_LABELS), origins, tuple(iop[:3]), tuple(iop[3:]),
                                  spacing)  # type: ignore[arg-type]
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort(origins @ normal)  # the order ITK stacks the files in
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(source_paths[i]) for i in order])
    ref = reader.Execute()
    workdir.mkdir(parents=True, exist_ok=True)
    files, attributes = [], []
    for sg in segments:
        img = sitk.GetImageFromArray((sided[order] == sg.number).astype(np.uint8))
        img.CopyInformation(ref)
        path = workdir / f"segment{sg.number}.nrrd"
        sitk.WriteImage(img, str(path), True)
        files.append(str(path))
        type_code = {"CodeValue": sg.label.snomed_code, "CodingSchemeDesignator": "SCT",
                     "CodeMeaning": sg.label.snomed_meaning}
        item = {
            "labelID": 1, "SegmentLabel": sg.display_name.capitalize(),
            "SegmentDescription": CATEGORY_CODE[2], "SegmentAlgorithmType": algorithm_type,
            "SegmentedPropertyCategoryCodeSequence": dict(zip(("CodeValue", "CodingSchemeDesignator", "CodeMeaning"),
                                                              CATEGORY_CODE)),
            "SegmentedPropertyTypeCodeSequence": type_code, "recommendedDisplayRGBValue": list(sg.label.rgb),
        }
        if algorithm_type != "MANUAL":
            item["SegmentAlgorithmName"] = "lower-limb-bones"
        modifier = {"L": LEFT_CODE, "R": RIGHT_CODE}.get(sg.side)
        if modifier:
            item["SegmentedPropertyTypeModifierCodeSequence"] = dict(
                zip(("CodeValue", "CodingSchemeDesignator", "CodeMeaning"), modifier))
        attributes.append([item])
    meta = {"ContentCreatorName": creator, "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "ClinicalTrialCoordinatingCenterName": "QIICR", "SeriesDescription": "Segmentation",
            "SeriesNumber": "100", "InstanceNumber": "1", "BodyPartExamined": "LEG",
            "segmentAttributes": attributes}
    (workdir / "meta.json").write_text(json.dumps(meta))
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([_dcmqi_exe(), "--inputImageList", ",".join(files), "--inputDICOMList",
                        ",".join(str(p) for p in source_paths), "--outputDICOM", str(out),
                        "--inputMetadata", str(workdir / "meta.json")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"itkimage2segimage failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
    return out


def copy_as_new_instance(seg_path: Path, out: Path, *, same_series: bool = True) -> Path:
    """The SEG at ``seg_path`` saved again unchanged under a new SOP Instance UID: OHIF storing a loaded,
    unedited result into its series (``same_series``) or into a new one."""
    ds = pydicom.dcmread(seg_path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if same_series:
        ds.InstanceNumber = int(ds.get("InstanceNumber", 1) or 1) + 1
    else:
        ds.SeriesInstanceUID = generate_uid()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def sent_classes(seg_path: Path, sources: list) -> np.ndarray:
    """The node's SEG read with pydicom alone (not the node's reader): per frame its segment's SNOMED code and
    its referenced source instance."""
    ds = pydicom.dcmread(seg_path)
    index = {d.SOPInstanceUID: k for k, d in enumerate(sources)}
    value = {int(it.SegmentNumber): _CODE_TO_VALUE[it.SegmentedPropertyTypeCodeSequence[0].CodeValue]
             for it in ds.SegmentSequence}
    px = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = np.zeros((len(sources), ds.Rows, ds.Columns), np.uint8)
    for k, fr in enumerate(ds.PerFrameFunctionalGroupsSequence):
        z = index[fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        out[z][px[k] > 0] = value[int(fr.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
    return out


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
