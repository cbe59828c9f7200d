"""Loading a stored series as a volume in patient geometry.

The slices come already ordered along the slice normal (see :func:`dicom_node.rules.stack`); here they are
decoded (compressed syntaxes through the pylibjpeg plugins) into one float32 array, and the metadata-only
datasets that the SEG encoder needs are kept alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from storage.models import Instance


@dataclass
class SeriesVolume:
    array: np.ndarray  # (n, rows, cols) float32, slices in stacking order
    datasets: list[Dataset]  # metadata only (no pixel data), same order
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_spacing: float

    @property
    def voxel_mm3(self) -> float:
        return float(self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing)


def load_series(instances: list[Instance]) -> SeriesVolume:
    datasets: list[Dataset] = []
    array = None
    for k, inst in enumerate(instances):
        ds = pydicom.dcmread(inst.path)
        px = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            px = px * slope + intercept
        if array is None:
            array = np.empty((len(instances),) + px.shape, dtype=np.float32)
        array[k] = px
        del ds.PixelData
        datasets.append(ds)
    assert array is not None
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    ps = tuple(float(v) for v in datasets[0].PixelSpacing)
    if len(datasets) > 1:
        normal = np.cross(iop[:3], iop[3:])
        p0 = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
        p1 = np.asarray([float(v) for v in datasets[-1].ImagePositionPatient])
        spacing = abs(float(np.dot(p1 - p0, normal))) / (len(datasets) - 1)
    else:
        spacing = float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    return SeriesVolume(array, datasets, tuple(iop[:3]), tuple(iop[3:]), ps, spacing)  # type: ignore[arg-type]
