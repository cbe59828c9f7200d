"""The fixed, versioned hold-out of the learning rounds: which corrections are kept back to judge a candidate.

Why fixed: a candidate is promoted only if it beats the serving model on corrections neither of them was trained
on. If the split were drawn anew every round (as MONAI Label's ``val_split`` is), a correction evaluated on in
one round would be trained on in the next, and the next comparison would flatter the model that saw it. So a
correction is assigned once, at the start of the first round after it arrived, and never moves: held out stays
held out, trainable stays trainable. ``holdout_round`` records the hold-out version it was assigned in (for
trainable ones too: that is what "assigned" means), so a round can say which hold-out it was measured on.

Only radiologists' edits count (state CORRECTED): an unchanged copy is not a verified label, an unusable or
deleted one is no label at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import func, select

from .db import Database
from .models import Correction, ModelVersion
from .states import CorrectionState


@dataclass
class Assignment:
    """What one call of :func:`assign` did."""

    version: int | None  # the hold-out version the new corrections got (None: nothing new to assign)
    held_out: list[int]  # ids newly held out
    trainable: list[int]  # ids newly made trainable


def _usable():
    """Corrected, and its labels file written: the intake records a corrected row with its scores first and
    names its labels file a moment later; a round in between must not take the row."""
    return (Correction.state == CorrectionState.CORRECTED) & (Correction.labels_path != "")


def assign(db: Database, fraction: float) -> Assignment:
    """Assign every not yet assigned correction: the newest of them held out so that about ``fraction`` of all
    corrections are (at least one, and at least one left to train on once there are two or more); the rest
    trainable. Earlier assignments are never changed.

    Counting the share over all corrections rather than over the new ones alone keeps a round that gets one
    new correction from holding that one out as well ("at least one" is met by the earlier hold-out).
    """
    with db.session() as s:
        rows = list(s.scalars(select(Correction).where(_usable()).order_by(Correction.received_at, Correction.id)))
        new = [c for c in rows if c.holdout_round is None]
        if not new:
            return Assignment(None, [], [])
        total = len(rows)
        already = sum(1 for c in rows if c.holdout and c.holdout_round is not None)
        want = max(1, int(fraction * total + 0.5))
        if total >= 2:
            want = min(want, total - 1)
        k = max(0, min(want - already, len(new)))
        # never leave nothing to train on when the earlier rounds left none either
        trainable_before = sum(1 for c in rows if not c.holdout and c.holdout_round is not None)
        if k == len(new) and trainable_before == 0 and len(new) >= 2:
            k = len(new) - 1
        version = int(s.scalar(select(func.max(Correction.holdout_round))) or 0) + 1
        held = new[len(new) - k:] if k else []  # the newest
        held_ids = {c.id for c in held}
        for c in new:
            c.holdout = c.id in held_ids
            c.holdout_round = version
        return Assignment(version, sorted(held_ids), sorted(c.id for c in new if c.id not in held_ids))


def trainable(db: Database) -> list[Correction]:
    """Corrections a round may train on: assigned and not held out, oldest first."""
    with db.session() as s:
        return list(s.scalars(select(Correction).where(
            _usable(), Correction.holdout.is_(False), Correction.holdout_round.is_not(None))
            .order_by(Correction.received_at, Correction.id)))


def held_out(db: Database) -> list[Correction]:
    """Corrections kept back to judge candidates (never trained on), oldest first."""
    with db.session() as s:
        return list(s.scalars(select(Correction).where(_usable(), Correction.holdout.is_(True))
                              .order_by(Correction.received_at, Correction.id)))


def current_version(db: Database) -> int:
    """The newest hold-out version (0 before the first round)."""
    with db.session() as s:
        return int(s.scalar(select(func.max(Correction.holdout_round))) or 0)


def new_since(db: Database, model_version: str) -> list[Correction]:
    """Corrections that arrived after ``model_version`` was made: neither trained on nor held out by it (a
    scheduled round waits for ``min_new_corrections`` of these). A version the registry does not know (the
    bundled model, before any round) has seen none."""
    with db.session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.version == model_version))
        seen: set[int] = set()
        if mv is not None:
            for field in (mv.trained_on, mv.held_out):
                try:
                    seen.update(int(i) for i in json.loads(field or "[]"))
                except (ValueError, TypeError):
                    pass
        rows = s.scalars(select(Correction).where(_usable()).order_by(Correction.received_at, Correction.id))
        return [c for c in rows if c.id not in seen]
