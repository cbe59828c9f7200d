"""Write a job's results: one SEG and one SR per SEG profile the destinations need, each checked after writing.

Nothing leaves the node from here; a result that does not match its source raises
:class:`~dicom_node.encode.validate.InvalidResult` and is never sent.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from ..config import Settings
from ..infer.compute import SeriesResult
from .context import result_context
from .seg_writer import build_seg
from .sr_writer import build_sr
from .validate import check_seg, check_sr


def seg_types(settings: Settings) -> list[str]:
    """The SEG profiles (binary, labelmap) the configured destinations ask for; binary when there are none."""
    return list(dict.fromkeys(d.seg_type for d in settings.destinations)) or ["binary"]


def flagged_description(description: str, failed: list[str]) -> str:
    """A series description that says the quality checks failed, and for which structures (64 characters,
    DICOM LO): what a radiologist sees in the viewer's series list before opening anything."""
    text = "QC FAILED " + ", ".join(failed) + " - " + description
    return text if len(text) <= 64 else (text[:61] + "...")


def encode_results(settings: Settings, result: SeriesResult, job_dir: Path,
                   failed: list[str] | None = None) -> tuple[Dataset, Path]:
    """Write ``SEG_<type>.dcm`` and ``SR_<type>.dcm`` into ``job_dir`` for each profile, re-read and check
    each against the source; returns the first SEG (its UIDs go on the job) and its path.

    ``failed``: the structures that failed the quality gate; then the SEG's series description and the SR
    (a qualitative evaluation per failed structure, and its series description) say so.
    """
    vol, out = result.volume, settings.output
    description = flagged_description(out.series_description, failed) if failed else out.series_description
    failed_names = {s for s in failed or []}
    first: tuple[Dataset, Path] | None = None
    context = result_context(vol.datasets)  # absent Type 2 attributes present and empty, text encodable
    labels = result.source_order_labels
    for seg_type in seg_types(settings):
        seg_path, sr_path = job_dir / f"SEG_{seg_type}.dcm", job_dir / f"SR_{seg_type}.dcm"
        seg = build_seg(context, labels, result.segments, result.card,
                        series_description=description, series_number=out.series_number,
                        manufacturer=out.manufacturer, segmentation_type=seg_type.upper())
        seg.save_as(seg_path, enforce_file_format=True)
        sr = build_sr(seg, context, result.segments, result.volumes_cm3, result.card,
                      labels=labels, series_number=out.series_number + 1, manufacturer=out.manufacturer,
                      failed=failed_names if failed is not None else None)
        sr.save_as(sr_path, enforce_file_format=True)
        # re-read what was written and compare it with the source before anything is sent
        written = check_seg(str(seg_path), vol.datasets)
        check_sr(str(sr_path), written, vol.datasets)
        first = first or (seg, seg_path)
    assert first is not None
    return first
