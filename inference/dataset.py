"""Reading a site's training data: DICOM series or NIfTI scans with NIfTI masks, checked against each other.

Layout of a dataset folder (one case = one scan and its masks)::

    dicom/<case>/*.dcm                 a DICOM series        } one of these per case
    images/<case>.nii.gz               or a NIfTI scan       }
    msk_<case>.nii.gz                  or a NIfTI scan named as in the published data }
    labels/<case>.nii.gz               one multi-class mask (values as the label table)   } one of these
    FEMUR/FEMUR_<case>.nii.gz, TIBIA/…, FIBULA/…, PELVIS/…   per-bone binary masks  } per case

The per-bone layout is the published one; a missing bone file means that bone is absent from the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .labels import DEFAULT_LABELS, Label

if TYPE_CHECKING:
    import SimpleITK


class _LazySimpleITK:
    """SimpleITK, imported on first use: training on generated data (inference.synth) imports this module
    for ``Case`` on machines without SimpleITK."""

    def __getattr__(self, name: str):
        import SimpleITK

        return getattr(SimpleITK, name)


sitk = _LazySimpleITK()


class DatasetError(ValueError):
    """A case cannot be used; the message names the case and what is wrong."""


@dataclass
class Case:
    name: str
    image: np.ndarray  # (n, rows, cols) float32, slice order of the file
    labels: np.ndarray  # (n, rows, cols) uint8
    spacing: tuple[float, float, float]  # (col, row, slice) mm
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))


def _strip(name: str) -> str:
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def list_cases(root: Path) -> list[str]:
    names = set()
    if (root / "dicom").is_dir():
        names |= {p.name for p in (root / "dicom").iterdir() if p.is_dir()}
    if (root / "images").is_dir():
        names |= {_strip(p.name) for p in (root / "images").iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    # the published layout keeps scans as msk_<N>.nii.gz next to the bone folders
    names |= {_strip(p.name)[4:] for p in root.glob("msk_*.nii*")}
    if not names:
        raise DatasetError(f"{root}: no cases found (expected dicom/<case>/ or images/<case>.nii.gz)")
    return sorted(names)


def read_scan(root: Path, case: str) -> SimpleITK.Image:
    d = root / "dicom" / case
    if d.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(d))
        if not ids:
            raise DatasetError(f"case {case}: no DICOM series in {d}")
        if len(ids) > 1:
            raise DatasetError(f"case {case}: {len(ids)} series in {d}; keep one series per case")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(d), ids[0]))
        return reader.Execute()
    for suf in (".nii.gz", ".nii"):
        for p in (root / "images" / f"{case}{suf}", root / f"msk_{case}{suf}"):
            if p.exists():
                return sitk.ReadImage(str(p))
    raise DatasetError(f"case {case}: no scan found")


def _on_scan_grid(case: str, what: str, scan: SimpleITK.Image, mask: SimpleITK.Image) -> SimpleITK.Image:
    """Return ``mask`` on the scan's voxel grid, or raise naming the case and what differs.

    Masks written by another tool often cover the very same voxels in another axis order (slices reversed,
    a flipped axis); those are re-indexed onto the scan's grid by nearest-neighbour resampling, which is
    exact when voxel centres coincide and is checked to lose no labelled voxel.
    """
    problems = _grid_differences(scan, mask)
    if not problems:
        return mask
    if sorted(np.round(scan.GetSpacing(), 3)) == sorted(np.round(mask.GetSpacing(), 3)):
        moved = sitk.Resample(mask, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        before = np.bincount(sitk.GetArrayViewFromImage(mask).ravel().astype(np.int64))
        after = np.bincount(sitk.GetArrayViewFromImage(moved).ravel().astype(np.int64), minlength=len(before))
        if np.array_equal(before, after[: len(before)]):
            return moved
    raise DatasetError(f"case {case}: mask {what} does not match the scan: " + "; ".join(problems))


def _grid_differences(scan: SimpleITK.Image, mask: SimpleITK.Image) -> list[str]:
    problems = []
    if scan.GetSize() != mask.GetSize():
        problems.append(f"size {mask.GetSize()} vs scan {scan.GetSize()}")
    if not np.allclose(scan.GetSpacing(), mask.GetSpacing(), atol=1e-3):
        problems.append(f"spacing {tuple(round(v, 4) for v in mask.GetSpacing())} "
                        f"vs scan {tuple(round(v, 4) for v in scan.GetSpacing())}")
    if not np.allclose(scan.GetOrigin(), mask.GetOrigin(), atol=0.05):
        problems.append(f"origin {tuple(round(v, 2) for v in mask.GetOrigin())} "
                        f"vs scan {tuple(round(v, 2) for v in scan.GetOrigin())}")
    if not np.allclose(scan.GetDirection(), mask.GetDirection(), atol=1e-3):
        problems.append("direction differs from the scan's")
    return problems


def read_labels(root: Path, case: str, scan: SimpleITK.Image, labels: tuple[Label, ...] = DEFAULT_LABELS) -> np.ndarray:
    shape = sitk.GetArrayViewFromImage(scan).shape
    for suf in (".nii.gz", ".nii"):
        p = root / "labels" / f"{case}{suf}"
        if p.exists():
            m = _on_scan_grid(case, p.name, scan, sitk.ReadImage(str(p)))
            arr = sitk.GetArrayFromImage(m).astype(np.int64)
            bad = set(np.unique(arr).tolist()) - {0} - {lab.value for lab in labels}
            if bad:
                raise DatasetError(f"case {case}: {p.name} has label values {sorted(bad)} not in the label table")
            return arr.astype(np.uint8)
    out = np.zeros(shape, dtype=np.uint8)
    found = False
    for lab in labels:
        for suf in (".nii.gz", ".nii"):
            p = root / lab.name / f"{lab.name}_{case}{suf}"
            if p.exists():
                m = _on_scan_grid(case, f"{lab.name}/{p.name}", scan, sitk.ReadImage(str(p)))
                out[(sitk.GetArrayViewFromImage(m) > 0) & (out == 0)] = lab.value
                found = True
                break
    if not found:
        raise DatasetError(f"case {case}: no masks (labels/{case}.nii.gz or <BONE>/<BONE>_{case}.nii.gz)")
    return out


def load_case(root: Path, case: str, labels: tuple[Label, ...] = DEFAULT_LABELS) -> Case:
    scan = read_scan(root, case)
    lab = read_labels(root, case, scan, labels)
    d = np.asarray(scan.GetDirection()).reshape(3, 3)
    return Case(
        name=case,
        image=sitk.GetArrayFromImage(scan).astype(np.float32),
        labels=lab,
        spacing=tuple(float(v) for v in scan.GetSpacing()),  # type: ignore[arg-type]
        row_dir=tuple(float(v) for v in d[:, 0]),  # type: ignore[arg-type]
        col_dir=tuple(float(v) for v in d[:, 1]),  # type: ignore[arg-type]
    )


def split_cases(names: list[str], folds: int, fold: int, seed: int,
                val_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Case-level split: slices of one case never sit on both sides.

    ``folds`` > 1 gives k-fold (``folds`` = number of cases gives leave-one-out); otherwise a
    ``val_fraction`` hold-out. Deterministic for a given seed.
    """
    perm = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if folds > 1:
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1}")
        val = perm[fold::folds]
    else:
        n_val = max(1, int(round(len(names) * val_fraction))) if len(names) > 1 else 0
        val = perm[:n_val]
    train = [n for n in perm if n not in val]
    if not train:
        raise DatasetError("no training cases left after the split; add cases or lower --val-fraction")
    return sorted(train), sorted(val)
