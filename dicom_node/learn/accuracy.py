"""Accuracy on the site's own patients: per model version and structure, what the radiologists' corrections
say about the node's results — count, median, spread, trend, control limits — and the ``accuracy-drop``
webhook when the serving model's rolling median falls below ``learning.accuracy_floor``.

Why this shape (docs/accuracy.md, ../shared/REFERENCE.md §7.6): the radiotherapy groups that monitor
auto-contouring from clinicians' edits use statistical process control. Limits come from a baseline window
(the first corrections of a model version; Mayo/UAB used 2σ limits and baselines of 10–50 cases, the
prostate study its first 150), and a point outside them is a case to look at, not a verdict. A drift is seen
in the rolling median, which one bad case cannot move. Only CORRECTED corrections are measures: an unedited
copy is unverified, never a Dice of 1.0.

Structure keys are the four bones (``femur``, ``tibia``, ``fibula``, ``pelvis``) and, where the intake scored
the sides apart, ``<bone>_left`` / ``<bone>_right``. The drop webhook watches the four bones only: a side
holds half the voxels and twice the noise, and one alert per bone is what an admin can act on.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from storage.accuracy import (
    Measure,
    corrected_measures,
    open_drops,
    record_accuracy_event,
    serving_version,
    state_counts,
)
from storage.db import Database
from storage.states import CorrectionState, EventKind

from ..config import Settings
from ..notify import notify

log = logging.getLogger("dicom_node.learn.accuracy")

STRUCTURES = ("femur", "tibia", "fibula", "pelvis")
SIDES = ("left", "right")
#: sigmas between the baseline mean and each control limit (the published monitoring used 2σ)
SIGMAS = 2.0

#: one check at a time in this process, so that two corrections recorded together notify a drop once
_check_lock = threading.Lock()


def structure_keys(keys: Iterable[str]) -> list[str]:
    """The known structure keys among ``keys``, each bone followed by its sides; anything else left out."""
    have = set(keys)
    order = [k for bone in STRUCTURES for k in (bone, *(f"{bone}_{side}" for side in SIDES))]
    return [k for k in order if k in have]


def min_count(window: int) -> int:
    """Corrections needed before a rolling median means anything (and before a drop is notified)."""
    return min(window, 3)


def rolling_medians(values: list[float], window: int) -> list[float]:
    """At each point, the median of the ``window`` newest values up to and including it."""
    return [statistics.median(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


@dataclass(frozen=True)
class ControlLimits:
    """Mean ± ``SIGMAS``·σ of a model version's first ``window`` corrections (sample σ). ``provisional``
    while the baseline is not yet full: the limits still move with each new correction."""

    mean: float
    sd: float
    lower: float
    upper: float
    baseline: int
    provisional: bool


def control_limits(values: list[float], window: int) -> ControlLimits | None:
    """Limits from the baseline (the first ``window`` values), or None with fewer than ``min_count``."""
    base = values[:window]
    if len(base) < max(2, min_count(window)):
        return None
    mean, sd = statistics.fmean(base), statistics.stdev(base)
    return ControlLimits(mean=mean, sd=sd, lower=mean - SIGMAS * sd, upper=mean + SIGMAS * sd,
                         baseline=len(base), provisional=len(base) < window)


@dataclass(frozen=True)
class Point:
    """One correction on a control chart."""

    correction: int
    dice: float
    received: str
    #: the rolling median at this point
    rolling: float
    #: "below" / "above" the control limits, "" inside them (or no limits yet)
    outside: str


@dataclass(frozen=True)
class StructureStats:
    structure: str
    count: int
    median: float
    q1: float
    q3: float
    min: float
    max: float
    mean: float
    #: the median of the newest ``window`` corrections
    rolling_median: float
    limits: ControlLimits | None
    #: in arrival order, oldest first (a control chart's x axis)
    points: tuple[Point, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def outside(self) -> list[Point]:
        return [p for p in self.points if p.outside]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [asdict(p) for p in self.points]
        #: the rolling median after each correction, newest first (the drift an admin looks for)
        d["trend"] = [p.rolling for p in reversed(self.points)]
        d["iqr"] = self.iqr
        d["n_outside"] = len(self.outside)
        return d


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (linear interpolation between the order statistics, as numpy's default)."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def structure_stats(structure: str, measures: list[tuple[int, float, str]], window: int) -> StructureStats:
    """Statistics of one structure over ``measures`` (correction id, Dice, received), oldest first."""
    values = [d for _, d, _ in measures]
    rolling = rolling_medians(values, window)
    limits = control_limits(values, window)
    points = []
    for (cid, d, at), r in zip(measures, rolling, strict=True):
        out = ""
        if limits is not None:
            out = "below" if d < limits.lower else "above" if d > limits.upper else ""
        points.append(Point(correction=cid, dice=d, received=at, rolling=r, outside=out))
    q1, q3 = quartiles(values)
    return StructureStats(structure=structure, count=len(values), median=statistics.median(values), q1=q1, q3=q3,
                          min=min(values), max=max(values), mean=statistics.fmean(values),
                          rolling_median=rolling[-1], limits=limits, points=tuple(points))


def version_stats(measures: list[Measure], window: int) -> dict[str, dict[str, StructureStats]]:
    """Per model version, per structure key: statistics of its CORRECTED measures (given oldest first)."""
    series: dict[str, dict[str, list[tuple[int, float, str]]]] = {}
    for m in measures:
        per = series.setdefault(m.model_version, {})
        for key, d in m.dice.items():
            per.setdefault(key, []).append((m.correction, d, m.received_at.isoformat(timespec="seconds")))
    return {ver: {k: structure_stats(k, per[k], window) for k in structure_keys(per)} for ver, per in series.items()}


def accuracy_summary(settings: Settings, db: Database) -> dict[str, Any]:
    """Everything the Corrections page, ``/api/accuracy`` and ``/metrics`` show: per model version (the
    serving one first) its corrections by state and its statistics per structure."""
    window = settings.learning.accuracy_window
    stats = version_stats(corrected_measures(db), window)
    counts = state_counts(db)
    serving = serving_version(db)
    versions = sorted(set(counts) | set(stats), key=lambda v: (v != serving, _version_key(v)))
    out = []
    for ver in versions:
        c = counts.get(ver, {s.value: 0 for s in CorrectionState})
        out.append({"model_version": ver, "serving": ver == serving and bool(ver),
                    "corrected": c.get(CorrectionState.CORRECTED, 0),
                    "unchanged_unverified": c.get(CorrectionState.UNCHANGED, 0),
                    "unusable": c.get(CorrectionState.UNUSABLE, 0), "waiting": c.get(CorrectionState.WAITING, 0),
                    "deleted": c.get(CorrectionState.DELETED, 0),
                    "structures": {k: st.as_dict() for k, st in stats.get(ver, {}).items()}})
    states = {s.value: sum(c.get(s, 0) for c in counts.values()) for s in CorrectionState}
    return {"floor": settings.learning.accuracy_floor, "window": window, "min_count": min_count(window),
            "sigmas": SIGMAS, "serving_version": serving, "states": states, "versions": out,
            "open_drops": [{"model_version": v, "structure": s} for v, s in sorted(open_drops(db))]}


def _version_key(v: str) -> tuple:
    """Newest version first where versions are dotted numbers ("0.10.0" after "0.9.1"); text otherwise."""
    parts = v.split(".")
    return tuple((0, -int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def check_accuracy_drop(settings: Settings, db: Database) -> list[dict[str, Any]]:
    """Notify ``accuracy-drop`` for each bone whose rolling median Dice, for the serving model version, is
    below ``learning.accuracy_floor`` over at least ``min_count`` corrections — once, until it recovers (a
    recovery is recorded as an ``accuracy-recovered`` event, without a webhook). Returns the payloads sent.

    Called after a correction is recorded (the intake) and safe to call at any time: the facts live in the
    database, so a restart neither repeats nor forgets an alert. Never raises into its caller's work: a
    failure is logged and nothing is notified.
    """
    try:
        with _check_lock:
            return _check(settings, db)
    except Exception:
        log.exception("accuracy check failed")
        return []


def _check(settings: Settings, db: Database) -> list[dict[str, Any]]:
    version = serving_version(db)
    if not version:
        return []
    floor, window = settings.learning.accuracy_floor, settings.learning.accuracy_window
    mine = [m for m in corrected_measures(db) if m.model_version == version]
    stats = version_stats(mine, window).get(version, {})
    notified = open_drops(db)
    sent = []
    for bone in STRUCTURES:
        st = stats.get(bone)
        if st is None or st.count < min_count(window):
            continue
        payload = {"structure": bone, "model_version": version, "rolling_median": round(st.rolling_median, 4),
                   "floor": floor, "count": st.count, "window": min(window, st.count)}
        is_open = (version, bone) in notified
        if st.rolling_median < floor and not is_open:
            record_accuracy_event(db, EventKind.ACCURACY_DROP, payload)
            notify(settings, "accuracy-drop", payload)
            sent.append(payload)
        elif st.rolling_median >= floor and is_open:
            record_accuracy_event(db, EventKind.ACCURACY_RECOVERED, payload)
            log.info("accuracy of %s recovered for model %s: rolling median %.3f", bone, version, st.rolling_median)
    return sent
