"""Where on the images a segment can be pointed at: its centre slice and an outline there.

Viewers that read TID 1500 by image coordinates (OHIF 3.x measurement tracking, Weasis's SR graphics) need
each measured structure tied to one image; a volume tied only to a SEG segment is skipped by OHIF, and
OHIF 3.13 even stops the viewer when no group has coordinates. The SR therefore names, per segment, the
slice in the middle of its extent and the convex outline of its largest piece there: enough to jump to and
see the structure; its exact voxels stay in the SEG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull


@dataclass(frozen=True)
class KeySlice:
    index: int            # index into the source images (the order the label map has)
    outline: np.ndarray   # closed polyline, (n, 2) column/row in SCOORD pixel coordinates (0,0 = top-left corner)


def key_slice(mask: np.ndarray, box: tuple[slice, ...] | None = None) -> KeySlice | None:
    """The middle slice holding ``mask`` (n, rows, cols) and the convex outline of its largest piece there;
    None for an empty mask. ``box``: ``mask`` is only this bounding box of the images (index and outline are
    still given on the whole images)."""
    at = [0, 0, 0] if box is None else [s.start for s in box]
    holding = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if not holding.size:
        return None
    index = int(holding[holding.size // 2])
    pieces, n = ndimage.label(mask[index])
    largest = 1 + int(np.argmax(np.bincount(pieces.ravel(), minlength=n + 1)[1:]))
    rows, cols = np.nonzero(pieces == largest)
    index, rows, cols = index + at[0], rows + at[1], cols + at[2]
    # the corners of the pixels, so that the outline encloses every pixel of the piece (even a single one)
    corners = np.unique(np.concatenate([np.stack([cols + dc, rows + dr], axis=1)
                                        for dr in (0, 1) for dc in (0, 1)]).astype(np.float32), axis=0)
    ring = corners[ConvexHull(corners).vertices]
    return KeySlice(index=index, outline=np.vstack([ring, ring[:1]]))
