"""What each destination receives: the SEG of its profile (binary or labelmap) and, unless
``send_sr = false``, the measurements SR, named as encode wrote them (encode/results.py). They are encoded
once per job and read here once, at queueing, so every re-send carries the same SOP Instance UIDs.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from storage.filestore import stored_path

from ..config import Destination, Settings
from ..encode.results import result_files


def files_for(dest: Destination, job_dir: Path) -> list[str]:
    """The files one destination receives: the SEG of its profile, and the SR unless ``send_sr = false``."""
    return [str(p) for p in result_files(job_dir).for_destination(dest.seg_type, dest.send_sr)]


def outbox_files(settings: Settings, job_dir: Path) -> dict[str, list[dict]]:
    """Per destination, the files of its profile with their SOP class and instance (read once, at queueing,
    so that every re-send carries exactly these UIDs). Paths are kept relative to the data folder, as every
    stored path is (storage/filestore.py); the sender resolves them when it sends."""
    read: dict[str, dict] = {}  # destinations of one profile share files: each is read once

    def meta(path: str) -> dict:
        if path not in read:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            read[path] = {"path": stored_path(settings.data_dir, path), "sop_class": str(ds.SOPClassUID),
                          "sop_uid": str(ds.SOPInstanceUID), "ts": str(ds.file_meta.TransferSyntaxUID)}
        return read[path]

    return {dest.name: [meta(path) for path in files_for(dest, job_dir)] for dest in settings.destinations}
