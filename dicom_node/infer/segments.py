"""From the model's label map to the segments a radiologist reads: left and right bones, one pelvis.

Femur, tibia and fibula are split into left and right from patient coordinates (LPS: +x is the patient's
left): each connected piece goes to the side of the midline its centre lies on. The midline is the
pelvis's centre when the pelvis is in the scan, else halfway between the two legs' pieces; a series that
declares its laterality (Laterality/ImageLaterality R or L) puts every piece on that side; a single leg
with neither gets no side rather than a guessed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.labels import LEFT_CODE, RIGHT_CODE, Label
from inference.postprocess import label_boxes

PAIRED = ("FEMUR", "TIBIA", "FIBULA")


@dataclass(frozen=True)
class Segment:
    number: int  # value in the segment label map, 1..K
    label: Label
    side: str  # "L", "R" or "" (unpaired or unknown)

    @property
    def name(self) -> str:
        return self.label.name + {"L": " LEFT", "R": " RIGHT"}.get(self.side, "")

    @property
    def display_name(self) -> str:
        return {"L": "Left ", "R": "Right "}.get(self.side, "") + self.label.name.lower()

    @property
    def modifier(self) -> tuple[str, str, str] | None:
        return {"L": LEFT_CODE, "R": RIGHT_CODE}.get(self.side)


def world_x(index_rc: np.ndarray, k: np.ndarray, origins: np.ndarray, row_dir, col_dir, spacing) -> np.ndarray:
    """Patient x of voxels given (row, col) indices and slice numbers on the source grid."""
    dr, dc = spacing
    return origins[k, 0] + index_rc[:, 1] * dc * row_dir[0] + index_rc[:, 0] * dr * col_dir[0]


def split_sides(labels: np.ndarray, card_labels: list[Label], origins: np.ndarray, row_dir, col_dir,
                spacing: tuple[float, float], declared: str = "") -> tuple[np.ndarray, list[Segment]]:
    """Return a label map numbered by segment (0 = background) and the segment list, in a stable order.

    Pieces are found and placed inside each structure's bounding box, so a whole-leg series costs what its
    bones cover, not its voxel count.
    """
    by_name = {lab.name: lab for lab in card_labels}
    boxes = label_boxes(labels)
    centres = []
    comp_info = []  # (name, box of the piece, its mask there, centre x, voxels)
    for name in PAIRED:
        lab = by_name.get(name)
        if lab is None or lab.value not in boxes:
            continue
        box = boxes[lab.value]
        comp, n = ndimage.label(labels[box] == lab.value)
        for i, sub in enumerate(ndimage.find_objects(comp), start=1):
            piece = comp[sub] == i
            at = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
            idx = np.argwhere(piece) + [s.start for s in at]
            x = float(world_x(idx[:, 1:], idx[:, 0], origins, row_dir, col_dir, spacing).mean())
            comp_info.append((name, at, piece, x, len(idx)))
            centres.append((name, x, len(idx)))
    side_of = _sider(labels, boxes, by_name, origins, row_dir, col_dir, spacing, centres, declared)
    pieces: dict[tuple[str, str], list[tuple[tuple[slice, ...], np.ndarray]]] = {}
    for name, at, piece, x, _ in comp_info:
        pieces.setdefault((name, side_of(x)), []).append((at, piece))
    out = np.zeros(labels.shape, dtype=np.uint8)
    segments: list[Segment] = []
    order = ([(n, s) for n in PAIRED for s in ("R", "L", "")]
             + [(lab.name, "") for lab in card_labels if lab.name not in PAIRED])
    for name, side in order:
        lab = by_name.get(name)
        if lab is None:
            continue
        if name in PAIRED:
            parts = pieces.get((name, side))
            if not parts:
                continue
        else:
            if lab.value not in boxes:
                continue
            box = boxes[lab.value]
            parts = [(box, labels[box] == lab.value)]
        seg = Segment(len(segments) + 1, lab, side)
        for at, piece in parts:  # pieces of different structures never overlap: the order cannot matter
            out[at][piece] = seg.number
        segments.append(seg)
    return out, segments


def _sider(labels, boxes, by_name, origins, row_dir, col_dir, spacing, centres, declared: str):
    if declared in ("L", "R"):
        return lambda x: declared
    pelvis = by_name.get("PELVIS")
    if pelvis is not None and pelvis.value in boxes:
        box = boxes[pelvis.value]
        idx = np.argwhere(labels[box] == pelvis.value)
        if len(idx) > 50:
            idx += [s.start for s in box]
            mid = float(world_x(idx[:, 1:], idx[:, 0], origins, row_dir, col_dir, spacing).mean())
            return lambda x: "L" if x > mid else "R"
    for name in PAIRED:
        big = sorted((c for c in centres if c[0] == name), key=lambda c: -c[2])[:2]
        if len(big) == 2 and big[1][2] > 0.25 * big[0][2] and abs(big[0][1] - big[1][1]) > 40:
            mid = (big[0][1] + big[1][1]) / 2
            return lambda x: "L" if x > mid else "R"
    return lambda x: ""
