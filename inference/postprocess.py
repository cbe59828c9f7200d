"""Cleaning a predicted label map: drop small islands, keep the large components, fill holes in long bones.

A 2D model can light up a few stray pixels in unrelated slices; left in, they show up as specks in the
viewer and inflate volumes. Bones here come in one or two large pieces (one per leg; one pelvis), so each
label keeps its largest 3D components and any component at least ``min_fraction`` of the largest one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Largest number of separate pieces kept per structure (one per leg for long bones; the bony pelvis
#: may show hip bones and sacrum apart on some slabs).
MAX_COMPONENTS = {"PELVIS": 3}

#: Structures whose slices are not solid: the pelvis rings around the pelvic cavity and the obturator
#: foramen, so filling its "holes" would add the cavity to the bone.
NO_HOLE_FILLING = {"PELVIS"}


def clean_labels(labels: np.ndarray, names: dict[int, str], min_fraction: float = 0.1,
                 min_voxels: int = 20, fill_holes: bool = True) -> np.ndarray:
    """Return a cleaned copy of ``labels`` (n, rows, cols) uint8."""
    out = np.zeros_like(labels)
    structure = ndimage.generate_binary_structure(3, 1)
    for value, name in names.items():
        mask = labels == value
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        sizes = np.bincount(comp.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        keep_n = MAX_COMPONENTS.get(name, 2)
        largest = sizes[order[0]]
        keep = [i + 1 for rank, i in enumerate(order)
                if sizes[i] >= max(min_voxels, min_fraction * largest) and rank < keep_n]
        if not keep:
            continue
        mask = np.isin(comp, keep)
        if fill_holes and name not in NO_HOLE_FILLING:
            for k in range(mask.shape[0]):
                if mask[k].any():
                    mask[k] = ndimage.binary_fill_holes(mask[k])
        out[mask & (out == 0)] = value
    return out


def volumes_cm3(labels: np.ndarray, names: dict[int, str], voxel_mm3: float) -> dict[str, float]:
    """Volume of each structure in cm³ (voxel count × voxel volume)."""
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {name: float(counts[v]) * voxel_mm3 / 1000.0 for v, name in names.items()}
