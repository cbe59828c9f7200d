"""Write a job's results: one SEG and one SR per SEG profile the destinations need, each checked after writing.

Nothing leaves the node from here; a result that does not match its source raises
:class:`~dicom_node.encode.validate.InvalidResult` and is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom.dataset import Dataset

from ..config import Settings
from ..infer.compute import SeriesResult
from .context import result_context
from .seg_writer import build_seg
from .sr_writer import build_sr
from .validate import check_seg, check_sr


class ResultKind(StrEnum):
    """The two objects written per SEG profile."""

    SEG = "SEG"
    SR = "SR"


@dataclass(frozen=True)
class ResultFiles:
    """Where a job's results lie: ``<KIND>_<profile>.dcm`` in the job's folder. Encode writes these names and
    deliver reads them, so the convention is spelled here only."""

    job_dir: Path

    def path(self, kind: ResultKind, seg_type: str) -> Path:
        return self.job_dir / f"{kind}_{seg_type}.dcm"

    def seg(self, seg_type: str) -> Path:
        return self.path(ResultKind.SEG, seg_type)

    def sr(self, seg_type: str) -> Path:
        return self.path(ResultKind.SR, seg_type)

    def for_destination(self, seg_type: str, send_sr: bool) -> list[Path]:
        """The files one destination receives: the SEG of its profile, and the SR unless it declines it."""
        return [self.seg(seg_type)] + ([self.sr(seg_type)] if send_sr else [])

    @staticmethod
    def kind_of(path: str | Path) -> str:
        """SEG or SR, from a result file's name (for messages about one file of a delivery); the whole name
        for a file this convention did not name."""
        name = Path(path).name
        head = name.split("_", 1)[0]
        return head if head in ResultKind.__members__ else name


def result_files(job_dir: Path) -> ResultFiles:
    """The result files of the job whose folder is ``job_dir``."""
    return ResultFiles(Path(job_dir))


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
    """Write the SEG and the SR of each profile into ``job_dir`` (named by :class:`ResultFiles`), re-read and check
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
    names = result_files(job_dir)
    for seg_type in seg_types(settings):
        seg_path, sr_path = names.seg(seg_type), names.sr(seg_type)
        seg = build_seg(context, labels, result.segments, result.card,
                        series_description=description, series_number=out.series_number,
                        manufacturer=out.manufacturer, segmentation_type=seg_type.upper())
        assert seg is not None, "results are encoded only for a series in which structures were found"
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
