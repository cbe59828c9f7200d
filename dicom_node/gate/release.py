"""What a judged result may do at each destination, given the gate's verdict and a person's review.

Kept apart from the orchestrator so that the rule a PACS admin configures (``quality_policy``) reads in one
small function, with no database or network around it: :class:`~dicom_node.pipeline.Pipeline` carries out
what :func:`release_plan` decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.states import QualityPolicy, ReviewDecision, Verdict

from ..config import Destination


@dataclass
class ReleasePlan:
    """The destinations that get the result now, those that wait for a review, those that never get it."""

    send: list[Destination] = field(default_factory=list)
    hold: list[Destination] = field(default_factory=list)
    drop: list[Destination] = field(default_factory=list)


def release_plan(verdict: str, review: str, destinations: list[Destination]) -> ReleasePlan:
    """A result that passed (or only warned), or that a person approved, goes to every destination. A failed
    one goes per destination's ``quality_policy``: ``send_flagged`` now (its SEG and SR say the checks
    failed), ``hold`` after a person approves it, ``drop`` never."""
    held = verdict == Verdict.FAIL and review != ReviewDecision.APPROVED
    if not held:
        return ReleasePlan(send=list(destinations))
    return ReleasePlan(send=[d for d in destinations if d.quality_policy == QualityPolicy.SEND_FLAGGED],
                       hold=[d for d in destinations if d.quality_policy == QualityPolicy.HOLD],
                       drop=[d for d in destinations if d.quality_policy == QualityPolicy.DROP])
