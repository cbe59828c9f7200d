"""``dicom-node corrections``: the radiologists' corrections the node received, and deleting one.

One line (or with ``--json`` one object) per received Segmentation object: its state (corrected, unchanged,
waiting, unusable, deleted) and reason, the source study and series, the job and model version it corrects, who made it
(Content Creator, station, calling AE) and when, and Dice per structure and side with the volume difference.
``--delete ID`` removes a correction's labels (an admin's decision, in the audit log); its source images are
then left to the retention purge again.
"""

from __future__ import annotations

import argparse
import json

from storage.states import CorrectionState

from .cli_base import cli_actor, cli_address


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corrections", help="corrected SEGs received from viewers: state, who, Dice per structure")
    p.add_argument("--json", action="store_true", help="one JSON list of objects")
    p.add_argument("-n", type=int, default=200, help="newest N (default 200)")
    p.add_argument("--state", choices=[str(c) for c in CorrectionState], help="only this state")
    p.add_argument("--delete", type=int, metavar="ID", help="delete correction ID (its label file, audit-logged)")
    p.set_defaults(func=cmd_corrections)


def _dice_words(metrics: dict) -> str:
    parts = []
    for key in sorted(metrics):
        m = metrics[key]
        if isinstance(m, dict) and "dice" in m:
            parts.append(f"{key} {m['dice']:.3f} ({m.get('volume_diff_cm3', 0):+.1f} cm³)")
    return ", ".join(parts)


def line(r: dict) -> str:
    """One correction as one line of text."""
    mean = f"mean Dice {r['mean_dice']:.3f}" if r["mean_dice"] is not None else "no Dice"
    who = ", ".join(x for x in (r["creator"] and f"by {r['creator']}", r["station"] and f"station {r['station']}",
                                r["calling_ae"] and f"from {r['calling_ae']}") if x)
    head = (f"{r['id']:>5} {r['state']:<9} {r['received_at'] or '':<19} study {r['study_uid'] or '-'} series "
            f"{r['series_uid'] or '-'} job {r['job'] or '-'} model {r['model_version'] or '-'}")
    out = [head, f"      {mean}" + (f"; {who}" if who else "")]
    dice = _dice_words(r["metrics"])
    if dice:
        out.append(f"      {dice}")
    if r["reason"]:
        out.append(f"      {r['reason']}")
    return "\n".join(out)


def cmd_corrections(args) -> int:
    from storage.corrections import delete_correction, list_corrections

    from ..config import load_settings
    from ..service import open_storage

    settings = load_settings(args.config)
    db = open_storage(settings)[0]
    if args.delete is not None:
        said = delete_correction(db, args.delete, settings.data_dir, cli_actor(), cli_address())
        print(said)
        return 0 if "deleted" in said else 1
    rows = list_corrections(db, args.n, args.state)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(line(r))
    if not rows:
        print("no corrections received")
    return 0
