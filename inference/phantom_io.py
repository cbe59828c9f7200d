"""Phantoms on disk: as DICOM series the node receives, as NIfTI training cases, and whole datasets.

Apart from ``inference/phantom.py`` (the anatomy and its rendering) because writing is what the tests, the
benchmarks and ``dicom-node phantoms`` do with a rendered phantom, and the renderer has no need of pydicom or
SimpleITK.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from .labels import DEFAULT_LABELS
from .phantom import Phantom, make_case


def write_dicom_series(
    ph: Phantom,
    folder: Path,
    *,
    study_uid: str | None = None,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Lower^Limb",
    series_description: str = "AX T1 LOWER LIMB",
    body_part: str = "LEG",
    series_number: int = 3,
    order: str = "as_acquired",
    frame_of_reference_uid: str | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write the phantom as an MR Image Storage series with the headers a scanner writes.

    ``order`` changes the file naming/instance numbering order only ("as_acquired", "reversed",
    "shuffled"), to test that the node sorts by geometry rather than by arrival or number.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    g = ph.geometry
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime(2026, 1, 1, 9, 0, 0)
    idx = list(range(g.n_slices))
    if order == "reversed":
        idx = idx[::-1]
    elif order == "shuffled":
        np.random.default_rng(seed).shuffle(idx)
    normal = np.cross(g.row_dir, g.col_dir)
    paths = []
    for n, k in enumerate(idx):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC" + patient_id[-6:]
        ds.Modality = "MR"
        ds.Manufacturer = "Synthetic Phantom"
        ds.ManufacturerModelName = "dicom-seg-node phantom"
        ds.InstitutionName = "Test Hospital"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI LOWER LIMBS"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "20150101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = f"{g.slice_thickness:.4g}"
        ds.SpacingBetweenSlices = f"{float(np.linalg.norm(g.slice_step)):.4g}"
        ds.RepetitionTime = "550"
        ds.EchoTime = "12"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.EchoTrainLength = "3"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = n + 1
        pos = g.slice_origin(k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*g.row_dir, *g.col_dir)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(np.dot(pos, normal)):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = g.rows, g.cols
        ds.PixelSpacing = [f"{v:.6f}" for v in g.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "1500"
        ds.WindowWidth = "3000"
        ds.PixelData = np.ascontiguousarray(ph.image[k]).tobytes()
        path = folder / f"IM{n + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_to_sitk(ph: Phantom, array: np.ndarray):
    """A SimpleITK image with the phantom's geometry (for NIfTI output)."""
    import SimpleITK as sitk

    g = ph.geometry
    img = sitk.GetImageFromArray(array)
    step = np.asarray(g.slice_step)
    thick = float(np.linalg.norm(step))
    img.SetSpacing((g.pixel_spacing[1], g.pixel_spacing[0], thick))
    img.SetOrigin(tuple(float(v) for v in g.origin))
    d = np.column_stack([g.row_dir, g.col_dir, step / thick])
    img.SetDirection(tuple(float(v) for v in d.ravel()))
    return img


def write_training_case(ph: Phantom, root: Path, case: str, *, dicom: bool = True, nifti_image: bool = False,
                        per_bone: bool = True, multiclass: bool = False, seed: int = 0) -> None:
    """Write one case in the training layout the ``train`` command reads.

    Scan as ``dicom/<case>/`` (DICOM series) and/or ``images/<case>.nii.gz``; masks as per-bone
    ``<BONE>/<BONE>_<case>.nii.gz`` (published layout) and/or ``labels/<case>.nii.gz`` (multi-class).
    """
    import SimpleITK as sitk

    if dicom:
        write_dicom_series(ph, root / "dicom" / case, patient_id=f"PH{case}", seed=seed)
    if nifti_image:
        (root / "images").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom_to_sitk(ph, ph.image.astype(np.int16)), str(root / "images" / f"{case}.nii.gz"))
    if per_bone:
        for lab in DEFAULT_LABELS:
            (root / lab.name).mkdir(parents=True, exist_ok=True)
            m = (ph.labels == lab.value).astype(np.uint8)
            sitk.WriteImage(phantom_to_sitk(ph, m), str(root / lab.name / f"{lab.name}_{case}.nii.gz"))
    if multiclass:
        (root / "labels").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom_to_sitk(ph, ph.labels), str(root / "labels" / f"{case}.nii.gz"))


def _write_one(args: tuple) -> str:
    root, case, seed, wide, harsh = args
    ph = make_case(seed, wide=wide, harsh=harsh)
    write_training_case(ph, Path(root), case, seed=seed)
    return case


def generate_dataset(root: Path, n_cases: int, seed: int = 0, wide: bool = False, workers: int = 2,
                     prefix: str = "ph", harsh: bool = False) -> list[str]:
    """Write ``n_cases`` random full-length phantoms (DICOM + per-bone NIfTI masks) under ``root``.

    Case ``i`` uses seed ``seed + i``, so a dataset is reproducible from its first seed and size.
    """
    import multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), f"{prefix}{seed + i:05d}", seed + i, wide, harsh) for i in range(n_cases)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return list(pool.imap(_write_one, jobs))
    return [_write_one(j) for j in jobs]
