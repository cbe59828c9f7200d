"""What accuracy monitoring reads from the corrections table, and the accuracy-drop events it writes.

Why its own module: the statistics (dicom_node/learn/accuracy.py), the dashboard, the JSON API and /metrics
all read the same rows the same way, and only here is the ``metrics`` JSON parsed. That JSON is written by
the intake from a SEG somebody else made: a value that is not a finite number between 0 and 1 is left out
rather than trusted, so that one odd row cannot turn a median into NaN.

Only CORRECTED rows are accuracy measures. An UNCHANGED copy proves nothing (an unedited result is not a
verified one: the AI-Evaluator study found edits concentrate where it matters), so it is counted apart and
never scored as Dice 1.0; UNUSABLE and DELETED rows are listed with their reason only.

The accuracy-drop webhook fires once per structure and model version until the rolling median recovers; what
was notified is kept as events (kinds ``accuracy-drop`` / ``accuracy-recovered``, no series, detail JSON
``{"model_version", "structure", ...}``) rather than in a table of its own, so the record is also the history.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from .db import Database
from .models import Correction, Event, Job, ModelVersion, Series
from .states import CorrectionState, EventKind, ModelState
from .timeline import add_event


@dataclass(frozen=True)
class Measure:
    """One CORRECTED correction as an accuracy measure: Dice per structure key (``femur``, ``femur_left``...)."""

    correction: int
    model_version: str
    received_at: dt.datetime
    dice: dict[str, float] = field(default_factory=dict)
    mean_dice: float | None = None


def _fraction(v: Any) -> float | None:
    """A Dice value as stored, or None when it is not a finite number in [0, 1]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) and 0.0 <= f <= 1.0 else None


def parse_metrics(text: str | None) -> dict[str, dict[str, float]]:
    """The ``metrics`` JSON of a correction: per structure key (lower case) its numeric fields; anything
    malformed is dropped."""
    try:
        raw = json.loads(text or "{}")
    except (ValueError, TypeError):
        return {}
    out: dict[str, dict[str, float]] = {}
    if not isinstance(raw, dict):
        return out
    for key, val in raw.items():
        if not isinstance(key, str) or not isinstance(val, dict):
            continue
        nums = {k: float(v) for k, v in val.items() if isinstance(k, str) and isinstance(v, (int, float))
                and not isinstance(v, bool) and math.isfinite(float(v))}
        out[key.strip().lower()[:32]] = nums
    return out


def dice_of(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per structure key, its Dice where it is a valid one."""
    out = {}
    for key, vals in metrics.items():
        d = _fraction(vals.get("dice"))
        if d is not None:
            out[key] = d
    return out


def corrected_measures(db: Database) -> list[Measure]:
    """Every CORRECTED correction, oldest first (the order a control chart reads)."""
    with db.session() as s:
        rows = s.execute(select(Correction.id, Correction.model_version, Correction.received_at, Correction.metrics,
                                Correction.mean_dice)
                         .where(Correction.state == CorrectionState.CORRECTED)
                         .order_by(Correction.received_at, Correction.id)).all()
    return [Measure(correction=cid, model_version=ver or "", received_at=at, dice=dice_of(parse_metrics(m)),
                    mean_dice=_fraction(mean)) for cid, ver, at, m, mean in rows]


def state_counts(db: Database) -> dict[str, dict[str, int]]:
    """Per model version, corrections by state (every state present, 0 where none)."""
    with db.session() as s:
        rows = s.execute(select(Correction.model_version, Correction.state, func.count())
                         .group_by(Correction.model_version, Correction.state)).all()
    out: dict[str, dict[str, int]] = {}
    for ver, st, n in rows:
        out.setdefault(ver or "", {c.value: 0 for c in CorrectionState})[st] = n
    return out


def correction_rows(db: Database, limit: int = 500) -> list[dict[str, Any]]:
    """The newest corrections, newest first, as the dashboard and ``/api/corrections`` show them: who made it
    and where from, what it corrected, and per structure key its Dice (CORRECTED and UNCHANGED rows; the
    unusable and deleted ones show their reason only)."""
    with db.session() as s:
        rows = s.execute(select(Correction, Series.series_uid)
                         .outerjoin(Series, Series.id == Correction.series_id)
                         .order_by(Correction.received_at.desc(), Correction.id.desc()).limit(limit)).all()
        out = []
        for c, series_uid in rows:
            scored = c.state in (CorrectionState.CORRECTED, CorrectionState.UNCHANGED)
            out.append({
                "id": c.id, "state": c.state, "reason": c.reason, "series": series_uid or "",
                "series_id": c.series_id, "job": c.job_id, "model_version": c.model_version,
                "creator": c.creator, "station": c.station, "calling_ae": c.calling_ae,
                "received": c.received_at.isoformat(timespec="seconds"),
                "content_at": c.content_at.isoformat(timespec="seconds") if c.content_at else None,
                "holdout": c.holdout,
                "dice": dice_of(parse_metrics(c.metrics)) if scored else {},
                "mean_dice": _fraction(c.mean_dice) if scored else None})
    return out


def serving_version(db: Database) -> str:
    """The model version that serves now: the registry's serving row; before the registry has one, the
    version the newest job recorded ("" when the node never segmented anything)."""
    with db.session() as s:
        v = s.scalar(select(ModelVersion.version).where(ModelVersion.state == ModelState.SERVING)
                     .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1))
        if v:
            return v
        return s.scalar(select(Job.model_version).where(Job.model_version != "")
                        .order_by(Job.id.desc()).limit(1)) or ""


def open_drops(db: Database) -> set[tuple[str, str]]:
    """(model version, structure) pairs whose accuracy drop was notified and has not recovered since."""
    with db.session() as s:
        rows = s.execute(select(Event.kind, Event.detail)
                         .where(Event.kind.in_([EventKind.ACCURACY_DROP, EventKind.ACCURACY_RECOVERED]))
                         .order_by(Event.id)).all()
    open_: set[tuple[str, str]] = set()
    for kind, detail in rows:
        try:
            d = json.loads(detail or "{}")
            key = (str(d["model_version"]), str(d["structure"]))
        except (ValueError, TypeError, KeyError):
            continue
        if kind == EventKind.ACCURACY_DROP:
            open_.add(key)
        else:
            open_.discard(key)
    return open_


def record_accuracy_event(db: Database, kind: EventKind, detail: dict[str, Any]) -> None:
    """An ``accuracy-drop`` or ``accuracy-recovered`` event (no series: it is about a model, not a study)."""
    with db.session() as s:
        add_event(s, kind, detail=json.dumps(detail, sort_keys=True))
