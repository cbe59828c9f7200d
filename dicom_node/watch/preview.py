"""The segmentation previews on a job's page: source slices with the SEG drawn over them, as PNG."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from sqlalchemy import select

from storage.db import Database
from storage.filestore import UnsafePath, resolve_stored
from storage.models import Instance, Job

log = logging.getLogger("dicom_node.watch.preview")


def _located(root: Path, stored: str, what: str) -> Path | None:
    """The file a stored path names in the data folder, or None (logged) when there is none to read."""
    try:
        path = resolve_stored(root, stored)
    except (FileNotFoundError, UnsafePath) as exc:
        log.warning("preview: %s: %s", what, exc)
        return None
    return path if path.is_file() else None


def preview_png(db: Database, root: Path, job_id: int, n: int = 4, structure: str | None = None) -> bytes | None:
    """A few source slices with the SEG overlaid, like the published work's GUI (cached beside the SEG).

    ``root`` is the data folder the stored paths are relative to. ``structure`` (a segment name such as
    "TIBIA LEFT"): three slices through that structure, only it drawn. The name only selects one of the SEG's
    own segments; the cache file is named by the segment's number, so a request's text never becomes part of
    a path."""
    import highdicom as hd
    import numpy as np
    import pydicom
    from PIL import Image

    from inference.labels import DEFAULT_LABELS

    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not job.seg_path:
            return None
        seg_path = _located(root, job.seg_path, f"the result of job {job_id}")
        if seg_path is None:
            return None
        stored = {i.sop_uid: i.path for i in s.scalars(select(Instance).where(Instance.series_id == job.series_id))}
    paths = {uid: path for uid, path in ((uid, _located(root, p, f"an image of job {job_id}"))
                                         for uid, p in stored.items() if p) if path is not None}
    seg = hd.seg.segread(seg_path)
    colour = {lab.snomed_code: lab.rgb for lab in DEFAULT_LABELS}
    seg_rgb = {int(d.SegmentNumber): colour.get(d.SegmentedPropertyTypeCodeSequence[0].CodeValue, (255, 255, 0))
               for d in seg.SegmentSequence}
    cache = Path(seg_path).with_name(f"preview_{job_id}.png")
    if structure is not None:
        words = structure.strip().lower().split()
        label = " ".join(words[1:] + words[:1])  # "TIBIA LEFT" -> "left tibia", the SEG's segment label
        number = next((int(d.SegmentNumber) for d in seg.SegmentSequence
                       if str(d.SegmentLabel).lower() == label), None)
        if number is None:
            return None
        seg_rgb = {number: seg_rgb[number]}
        cache = Path(seg_path).with_name(f"preview_{job_id}_s{number}.png")
        n = 3
    if cache.is_file():
        return cache.read_bytes()
    uids = [u for u in dict.fromkeys(r[2] for r in seg.get_source_image_uids()) if paths.get(u)]
    if not uids:
        return None
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    if structure is not None:
        labels = np.where(labels == next(iter(seg_rgb)), labels, 0)
    counts = (labels > 0).reshape(len(uids), -1).sum(1)
    if structure is not None:  # slices spread along the structure, not only its widest ones
        has = np.nonzero(counts)[0]
        picks = sorted({int(has[round(f * (len(has) - 1))]) for f in (0.2, 0.5, 0.8)}) if len(has) else []
    else:
        picks = sorted(np.argsort(counts)[::-1][:n])
    if not picks:
        return None
    tiles = []
    for k in picks:
        img = pydicom.dcmread(paths[uids[k]]).pixel_array.astype(np.float32)
        g = np.clip(img / (np.percentile(img, 99.5) or 1) * 255, 0, 255)
        rgb = np.stack([g] * 3, -1)
        for num, c in seg_rgb.items():
            m = labels[k] == num
            rgb[m] = 0.5 * rgb[m] + 0.5 * np.asarray(c, np.float32)
        tiles.append(rgb.astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, 1)).save(buf, format="PNG")
    cache.write_bytes(buf.getvalue())
    return buf.getvalue()
