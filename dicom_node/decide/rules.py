"""Deciding which complete series are segmented, and saying why the others are not.

Checks, in order: the configured rules (modality, lower-limb terms in body part or descriptions), the
geometry (the slices must stack into one volume: see dicom_node/slices.py), the rule's minimum slice count,
and the size the worker can hold in memory (``worker.max_megavoxels``).
Every series that is not segmented gets a reason an admin can read in ``dicom-node jobs``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from storage.models import Instance, Series

from ..config import Rule
from ..slices import stack

#: Memory a job holds per voxel of its series while the model runs with the quality gate's passes (float32
#: volume, class probabilities, the augmented pass, labels): measured on the CPU path, 448² slices.
BYTES_PER_VOXEL = 26


@dataclass
class Decision:
    segment: bool
    reason: str = ""
    rule: str = ""
    urgent: bool = False
    instances: list[Instance] = field(default_factory=list)  # the slices to segment, in stacking order


def _has_term(text: str, terms: list[str]) -> str | None:
    up = re.sub(r"[_^/\-]", " ", text.upper())
    for term in terms:
        if re.search(r"(?<![A-Z0-9])" + re.escape(term.upper()) + r"(?![A-Z0-9])", up):
            return term
    return None


def match_rules(series: Series, study_description: str, rules: list[Rule]) -> tuple[Rule | None, str]:
    """The first rule the series' headers satisfy (slice count aside), or the reasons none did."""
    reasons = []
    for rule in rules:
        if series.modality.upper() not in {m.upper() for m in rule.modalities}:
            reasons.append(f"modality {series.modality or 'missing'} not in {rule.modalities}")
            continue
        text = " | ".join((series.body_part, study_description, series.series_description))
        if rule.terms and not _has_term(text, rule.terms):
            reasons.append("no lower-limb term in body part, study or series description")
            continue
        return rule, ""
    uniq = list(dict.fromkeys(reasons))
    return None, "; ".join(uniq) if uniq else "no rules configured"


def decide(series: Series, study_description: str, instances: list[Instance], rules: list[Rule],
           max_megavoxels: int = 0) -> Decision:
    """``max_megavoxels``: the largest series the worker takes (0: any); see :data:`BYTES_PER_VOXEL`."""
    rule, why = match_rules(series, study_description, rules)
    if rule is None:
        return Decision(False, why)
    ordered, why = stack(instances)
    if ordered is None:
        return Decision(False, why, rule.name)
    n_slices = sum(i.frames or 1 for i in ordered)
    if n_slices < rule.min_slices:
        return Decision(False, f"{n_slices} slices, rule '{rule.name}' needs at least {rule.min_slices}", rule.name)
    voxels = sum((i.frames or 1) * (i.rows or 0) * (i.columns or 0) for i in ordered)
    if max_megavoxels and voxels > max_megavoxels * 1_000_000:
        return Decision(False, f"{voxels / 1e6:.0f} million voxels, more than worker.max_megavoxels "
                               f"({max_megavoxels}) lets the worker hold (about {BYTES_PER_VOXEL} bytes a voxel)",
                        rule.name)
    return Decision(True, why, rule.name, rule.urgent, ordered)  # why: a note such as dropped duplicates
