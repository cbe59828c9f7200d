"""Deliver one job's results to every configured destination, recording each attempt in ``deliveries``.

Each destination gets its profile's files (SEG type, SR or not) over DIMSE C-STORE or DICOMweb STOW-RS.
A destination that already has the job's results (an earlier attempt reached it) is skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from storage import queue
from storage.db import Database
from storage.models import utcnow

from ..config import Destination, Settings
from .sender import send_items, stow

log = logging.getLogger("dicom_node.deliver")


def files_for(dest: Destination, job_dir: Path) -> list[str]:
    """The files one destination receives: the SEG of its profile, and the SR unless ``send_sr = false``."""
    files = [str(job_dir / f"SEG_{dest.seg_type}.dcm")]
    if dest.send_sr:
        files.append(str(job_dir / f"SR_{dest.seg_type}.dcm"))
    return files


def send_to(settings: Settings, dest: Destination, files: list[str]) -> tuple[bool, str]:
    """One attempt at one destination: (ok, what went wrong)."""
    try:
        if dest.protocol == "stow":
            res = stow(dest.url, files, dest.username, dest.password)
        else:
            res = send_items(dest.host, dest.port, dest.ae_title, files,
                             calling=dest.calling_ae_title or settings.scp.ae_title)
        return res.ok, "ok" if res.ok else "; ".join(f for _, f in res.failed)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def deliver_job(settings: Settings, db: Database, job_id: int, job_dir: Path,
                destinations: list[Destination] | None = None) -> list[str]:
    """Send each destination (all configured, or those given) its files, retrying each with exponential
    backoff; returns what still failed."""
    errors = []
    done = queue.delivered_to(db, job_id)  # a repeated delivery skips destinations that have it
    for dest in settings.destinations if destinations is None else destinations:
        if dest.name in done:
            continue
        files = files_for(dest, job_dir)
        for attempt in range(1, dest.retries + 2):
            started = utcnow()
            ok, status = send_to(settings, dest, files)
            queue.record_delivery(db, job_id, dest.name, attempt, ok, "ok" if ok else "failed",
                                  "" if ok else status, started)
            if ok:
                break
            log.warning("delivery to %s failed (attempt %d): %s", dest.name, attempt, status)
            if attempt <= dest.retries:
                time.sleep(dest.backoff_seconds * 2 ** (attempt - 1))
        else:
            errors.append(f"{dest.name}: {status}")
    return errors
