"""What each destination receives: the SEG of its profile (binary or labelmap) and, unless
``send_sr = false``, the measurements SR. The outbox (outbox.py) sends these files; they are encoded once
per job, so every re-send carries the same SOP Instance UIDs.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Destination


def files_for(dest: Destination, job_dir: Path) -> list[str]:
    """The files one destination receives: the SEG of its profile, and the SR unless ``send_sr = false``."""
    files = [str(job_dir / f"SEG_{dest.seg_type}.dcm")]
    if dest.send_sr:
        files.append(str(job_dir / f"SR_{dest.seg_type}.dcm"))
    return files
