"""Slices into a volume: the one place that orders a series' slices along their normal, drops localizers and
repeated positions, and finds the gaps between stations.

Used by the decide stage (does the series stack at all?) and by the infer stage (what to load); both read
it here, so neither reaches into the other.
"""

from __future__ import annotations

import numpy as np

from storage.models import Instance

#: A step between slices longer than this many times the usual one is a gap between stations.
GAP_FACTOR = 1.5
#: Fewest slices in one block of a series with gaps (fewer: skipped, most likely stray slices).
MIN_BLOCK_SLICES = 3


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split("\\") if v != ""]
    except ValueError:
        return []


def stack(instances: list[Instance]) -> tuple[list[Instance] | None, str]:
    """Order slices into a volume, or say why they do not form one (None, reason).

    Localizers are left out and a repeated position keeps the instance received last; the second value
    then notes what was dropped.
    """
    images = [i for i in instances if i.rows and i.columns]
    if not images:
        return None, "no image instances in the series"
    if any(not (i.frame_of_reference_uid or "").strip() for i in images):
        return None, ("no Frame of Reference UID (0020,0052): cannot place a segmentation without a frame of "
                      "reference; send the series with it (an anonymiser may have removed it)")
    if any((i.frames or 1) > 1 for i in images):
        if len(images) == 1:
            return images, ""  # one multi-frame instance: its frames are checked and ordered when loaded
        return None, "several multi-frame instances in one series (stacks or time points) are not segmented"
    localizers = [i for i in images if "LOCALIZER" in (i.image_type or "").upper()]
    images = [i for i in images if i not in localizers]
    if not images:
        return None, "only localizer images"
    ori = [tuple(_floats(i.orientation)) for i in images]
    if any(len(o) != 6 for o in ori):
        return None, ("missing or malformed ImageOrientationPatient (0020,0037): without the slice orientation "
                      "the segmentation cannot be placed")
    ref = np.asarray(ori[0])
    if abs(np.linalg.norm(ref[:3]) - 1) > 0.01 or abs(np.linalg.norm(ref[3:]) - 1) > 0.01 \
            or abs(float(np.dot(ref[:3], ref[3:]))) > 0.01:
        return None, ("malformed ImageOrientationPatient (0020,0037): its row and column directions are not two "
                      "perpendicular unit vectors, so the slices cannot be placed")
    if any(np.abs(np.asarray(o) - ref).max() > 1e-3 for o in ori):
        n = len({tuple(np.round(o, 3)) for o in ori})
        return None, f"mixed orientations ({n} different ImageOrientationPatient values)"
    normal = np.cross(ref[:3], ref[3:])
    if abs(normal[2]) < 0.8:
        plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
        return None, f"{plane} slices: the model segments axial slices only"
    spacing = [_floats(i.pixel_spacing) for i in images]
    if any(len(sp) != 2 or min(sp) <= 0 for sp in spacing):
        return None, ("missing or malformed PixelSpacing (0028,0030): without the pixel size the segmentation "
                      "cannot be placed and no volume can be measured")
    if len({(i.rows, i.columns) for i in images}) > 1:
        return None, "slices differ in rows/columns"
    if len({i.pixel_spacing for i in images}) > 1:
        return None, "slices differ in pixel spacing"
    if len({i.frame_of_reference_uid for i in images}) > 1:
        return None, "slices from more than one frame of reference"
    pos = [_floats(i.position) for i in images]
    if any(len(p) != 3 for p in pos):
        return None, ("missing or malformed ImagePositionPatient (0020,0032): without slice positions the slices "
                      "cannot be stacked into a volume")
    d = np.asarray(pos) @ normal
    # a position sent twice (a repeated slice, a re-sent corrected image): the instance received last wins
    received = [(getattr(i, "received_at", None) or 0, getattr(i, "id", 0) or 0) for i in images]
    order = sorted(range(len(images)), key=lambda k: (round(float(d[k]), 3), received[k]))
    keep = [k for n, k in enumerate(order)
            if n + 1 == len(order) or round(float(d[order[n + 1]]), 3) != round(float(d[k]), 3)]
    note = (f"{len(order) - len(keep)} duplicate slice positions: kept the instance received last"
            if len(keep) < len(order) else "")
    order = keep
    d = d[np.asarray(order)]
    if len(d) > 1:
        steps = np.diff(d)
        step = float(np.median(steps))
        regular = np.abs(steps - step) <= 0.1 * step + 0.01
        gap = steps > GAP_FACTOR * step
        if not (regular | gap).all():
            return None, (f"inconsistent slice spacing ({steps.min():.2f}–{steps.max():.2f} mm): overlapping "
                          "stations or irregular slices")
        if gap.any():
            sizes = np.diff(np.concatenate([[0], np.flatnonzero(gap) + 1, [len(d)]]))
            if sizes.min() < MIN_BLOCK_SLICES:
                return None, (f"gaps split the series into blocks of {'+'.join(map(str, sizes))} slices; "
                              f"each needs at least {MIN_BLOCK_SLICES}")
            gaps = ", ".join(f"{g:.1f}" for g in steps[gap])
            block_note = (f"{len(sizes)} blocks of {'+'.join(map(str, sizes))} slices with gaps of {gaps} mm "
                          "(several stations): each block segmented as its own volume")
            note = "; ".join(x for x in (note, block_note) if x)
    return [images[k] for k in order], note


def stack_blocks(instances: list[Instance]) -> tuple[list[list[Instance]] | None, str]:
    """:func:`stack`, then cut at the gaps between stations: what a job loads, one volume per block."""
    ordered, note = stack(instances)
    return (None, note) if ordered is None else (split_blocks(ordered), note)


def split_blocks(ordered: list[Instance]) -> list[list[Instance]]:
    """Slices in stacking order (from :func:`stack`) cut into runs without gaps; one run for most series.

    A leg scanned in several stations may arrive as one series whose positions jump between stations;
    each run is segmented as its own volume (its own intensity range, 3D clean-up and slice spacing).
    """
    if len(ordered) < 2 or any((i.frames or 1) > 1 for i in ordered):
        return [ordered]
    ori = np.asarray(_floats(ordered[0].orientation))
    normal = np.cross(ori[:3], ori[3:])
    d = np.asarray([_floats(i.position) for i in ordered]) @ normal
    steps = np.diff(d)
    cuts = np.flatnonzero(steps > GAP_FACTOR * float(np.median(steps))) + 1
    bounds = [0, *cuts.tolist(), len(ordered)]
    return [ordered[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
