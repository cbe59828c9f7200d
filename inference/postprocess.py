"""Cleaning a predicted label map: drop small islands, keep the large components, fill holes in long bones.

A 2D model can light up a few stray pixels in unrelated slices; left in, they show up as specks in the
viewer and inflate volumes. Bones here come in one or two large pieces (one per leg; one pelvis), so each
label keeps its largest 3D components and any component at least ``min_fraction`` of the largest one.

Every step works inside the structure's bounding box (a whole-leg series is mostly not bone): components
and holes found there are the ones the whole volume has, voxel for voxel, because nothing of the structure
lies outside its box and background outside the box always reaches the image border.
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

#: 3D face connectivity for a structure's pieces; in-plane edge connectivity (no link between slices) for the
#: background of each slice, as ``binary_fill_holes`` of one slice uses.
_FACES = ndimage.generate_binary_structure(3, 1)
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def nonzero_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels of ``labels`` (n, rows, cols), None when all are zero: two
    vectorised reductions (slices holding anything; the maximum over slices), not a per-voxel loop."""
    held = np.flatnonzero(labels.any(axis=(1, 2)))
    if not held.size:
        return None
    top = labels[held[0]:held[-1] + 1].max(axis=0)
    rows, cols = np.flatnonzero(top.any(axis=1)), np.flatnonzero(top.any(axis=0))
    return slice(held[0], held[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def label_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box of each label value present (``find_objects`` inside the box of all of them)."""
    inner = nonzero_box(labels)
    if inner is None:
        return {}
    return {v + 1: tuple(slice(o.start + b.start, o.start + b.stop) for o, b in zip(inner, box))
            for v, box in enumerate(ndimage.find_objects(labels[inner])) if box is not None}


def fill_slice_holes(mask: np.ndarray) -> np.ndarray:
    """Each slice of ``mask`` (n, rows, cols) with its holes filled, as ``binary_fill_holes`` slice by slice:
    background pieces (edge-connected within the slice) that do not touch the slice's border are holes."""
    background, n = ndimage.label(~mask, structure=_IN_PLANE)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, bool)
    outside[0] = True  # the structure itself
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    return ~outside[background] | mask


def kept_pieces(mask: np.ndarray, name: str, min_fraction: float, min_voxels: int) -> np.ndarray | None:
    """``mask`` with only its largest pieces (see the module docstring); None when none is kept."""
    comp, n = ndimage.label(mask, structure=_FACES)
    sizes = np.bincount(comp.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep_n = MAX_COMPONENTS.get(name, 2)
    largest = sizes[order[0]]
    keep = [i + 1 for rank, i in enumerate(order)
            if sizes[i] >= max(min_voxels, min_fraction * largest) and rank < keep_n]
    if not keep:
        return None
    lut = np.zeros(n + 1, bool)
    lut[keep] = True
    return lut[comp]


def clean_labels(labels: np.ndarray, names: dict[int, str], min_fraction: float = 0.1,
                 min_voxels: int = 20, fill_holes: bool = True) -> np.ndarray:
    """Return a cleaned copy of ``labels`` (n, rows, cols) uint8."""
    out = np.zeros_like(labels)
    boxes = label_boxes(labels)
    for value, name in names.items():
        box = boxes.get(value)
        if box is None:
            continue
        mask = kept_pieces(labels[box] == value, name, min_fraction, min_voxels)
        if mask is None:
            continue
        if fill_holes and name not in NO_HOLE_FILLING:
            mask = fill_slice_holes(mask)
        region = out[box]
        region[mask & (region == 0)] = value
    return out


def volumes_cm3(labels: np.ndarray, names: dict[int, str], voxel_mm3: float) -> dict[str, float]:
    """Volume of each structure in cm³ (voxel count × voxel volume)."""
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {name: float(counts[v]) * voxel_mm3 / 1000.0 for v, name in names.items()}
