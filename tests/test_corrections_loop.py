"""Issue 27's whole loop on small data, through a real node process, dcmtk's storescu and storescp.

The bundled model is wrong on the real-shape stand-in (``bench/corrections_family.py``: bones of the paediatric
shape model, a renderer never used in training); three studies go to the node, their results are approved and
delivered, a radiologist's corrections (the truth, saved as OHIF and as 3D Slicer save them) come back by
storescu, ``dicom-node corrections --json`` scores each sent result as this test scores it, ``dicom-node learn
--promote --json`` trains and promotes a model, and the next study of the family, segmented by that model (its
job records the version ``dicom-node models --json`` serves), scores clearly better than the bundled model does
on the same images and than the first three did. The same steps, full size, are ``bench/corrections_loop.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import NodeProcess, PacsSCP

from bench.corrections_family import dice, small_study
from bench.corrections_loop import (
    AGREEMENT,
    agreement,
    correct,
    delivered,
    learn,
    row_of,
    send_study,
    serving_version,
    storescu,
    structure_dice,
    wait_corrections,
)

pytestmark = pytest.mark.slow

#: the three corrected studies and the next one (stand-in shape indices: held-out random draws)
*SHAPES, NEXT = (int(i) for i in os.environ.get("CORRECTIONS_LOOP_SHAPES", "30,31,33,35").split(","))
#: fine-tune steps of the round (``learn --max-steps``: the same candidate on every run, whatever the machine's
#: load; one step is batch 8 of 160² crops (the [learning] recipe below), 5-10 s on this shared 2-core machine)
STEPS = os.environ.get("CORRECTIONS_LOOP_STEPS", "30")
#: how much better the next study must score (mean Dice over the structures in its truth), against the
#: bundled model on the same images and against the first three studies' mean. Measured on shapes
#: 30,31,33 -> 35: 30 steps (rounds ab6875d) +0.259 over the bundled model on the same study, +0.270 over the
#: first three; 12 steps +0.102 (rounds 29e9b27) or no promotion at all (ab6875d). A given shape set trains the
#: same candidate every run, so well under half the measured gain keeps the test from flaking while a round
#: that learns little (the 12-step one) still fails it
MARGIN = 0.10


def mean_present(d: dict, truth: np.ndarray) -> float:
    """Mean Dice over the structures the truth has (a structure only predicted scores 0 and is not counted:
    the small studies are hips and thighs, and the bundled model calls some of the thigh fibula)."""
    from bench.corrections_family import STRUCTURES

    return float(np.mean([d[n] or 0.0 for n, v in STRUCTURES.items() if (truth == v).any()]))


def test_corrections_teach_the_node_and_the_next_study_is_better(tmp_path, bundled_predictor):
    pacs = PacsSCP(tmp_path / "pacs")
    # the recipe measured on these small studies (128 px hips and thighs): 160² crops, 8 a step, three quarters
    # showing bone; the whole-slice default, measured on whole-leg studies, lost its round here at 30 steps
    node = NodeProcess(tmp_path, pacs, more="[learning]\ncrop = 160\nbatch_size = 8\nforeground = 0.75\n")
    try:
        studies = [send_study(node, small_study(i), tmp_path / f"s{i}", f"CL{i}", seed=i) for i in SHAPES]
        for s in studies:
            delivered(node, pacs, s, timeout=300)
        first_versions = {s.job["model_version"] for s in studies}
        assert len(first_versions) == 1 and "" not in first_versions, first_versions
        for s, style in zip(studies, ("ohif", "slicer", "ohif")):
            storescu(node, correct(s, style, tmp_path / f"{s.name}-{style}.dcm"), aet="VIEWER")
        rows = wait_corrections(node, studies, timeout=180)
        for s in studies:
            row = row_of(rows, s)
            assert row is not None and row.get("state", "corrected") == "corrected", row
            assert agreement(structure_dice(row), s.sent_dice) <= AGREEMENT, (row, s.sent_dice)

        report, seconds = learn(node, "--max-steps", STEPS, timeout=900)
        serving = serving_version(node)
        assert report["promoted"] and serving == report["candidate_version"], json.dumps(report)[:3000]
        assert serving not in first_versions, serving

        ph = small_study(NEXT)
        g = ph.geometry
        as_sent = bundled_predictor().predict(ph.image, g.row_dir, g.col_dir, pixel_spacing=g.pixel_spacing)
        bundled = dice(as_sent.labels, ph.labels)
        nxt = delivered(node, pacs, send_study(node, ph, tmp_path / f"s{NEXT}", f"CL{NEXT}", seed=NEXT), timeout=300)
        assert nxt.job["model_version"] == serving, nxt.job
        after, before = mean_present(nxt.sent_dice, ph.labels), mean_present(bundled, ph.labels)
        first = float(np.mean([mean_present(s.sent_dice, s.truth) for s in studies]))
        print(f"learn {seconds:.0f} s; next study: bundled {before:.3f} -> promoted {after:.3f} "
              f"(first three, bundled: {first:.3f}); {bundled} -> {nxt.sent_dice}")
        assert after >= before + MARGIN and after >= first + MARGIN, (bundled, nxt.sent_dice, first)
    finally:
        node.stop()
        pacs.stop(validate=False)  # the node's SEGs are validated by the end-to-end tests
