"""Issue 16's acceptance test, run on this project's stand-in: a foreign-family phantom sent through the node
as a PACS would, and the SEG that comes back scored against the phantom's bones.

The people steering measure the bar on an independent phantom this project never sees: they send it to the
node and score what reaches the PACS. This does the same with the foreign family
(``inference/synth/foreign.py``: anatomy and renderer never used in training or model selection): dcmtk's
storescu sends the series, the node runs the bundled model with the quality gate's augmented pass, as
installed (default policy ``hold``), and dcmtk's storescp is the PACS. So it checks what ``dicom-node
evaluate`` cannot: that the gate holds the result (the family's lower pelvis is missed, README), that nothing
reaches the PACS before someone approves, and that the SEG sent after approval carries, slice for slice and
per side, the segmentation evaluate scores — the Dice of the delivered SEG, not of the network's output.

One case in the suite (about a minute on 2 cores); ``FOREIGN_THROUGH_NODE_CASES=4`` runs the four cases of the
README's table (seeds 500-503) and prints each one's Dice.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, wait_for

pytestmark = pytest.mark.slow

N_CASES = int(os.environ.get("FOREIGN_THROUGH_NODE_CASES", "1"))
SEED = 500  # the README's foreign table: dicom-node phantoms --family foreign --cases 4 --seed 500
BONES = {"FEMUR": 1, "TIBIA": 2, "FIBULA": 3, "PELVIS": 4}


def job_of(node: NodeProcess, series_uid: str) -> dict:
    return next(j for j in node.jobs() if j["series_uid"] == series_uid)


def seg_at(pacs: PacsSCP, series_uid: str) -> pydicom.Dataset | None:
    for p in pacs.files():
        ds = pydicom.dcmread(p)
        if ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            return ds
    return None


def bone_dice(seg: pydicom.Dataset, uids: list[str], truth: np.ndarray) -> dict[str, float]:
    """Dice per bone of the delivered SEG, both sides together, on the source slices in ``uids`` order."""
    import highdicom as hd

    s = hd.seg.Segmentation.from_dataset(seg)
    pred = np.zeros(truth.shape, np.uint8)
    for number in s.segment_numbers:
        bone = s.get_segment_description(number).segment_label.split()[-1].upper()  # "Right femur" -> FEMUR
        mask = s.get_pixels_by_source_instance(uids, segment_numbers=[number], combine_segments=True,
                                               skip_overlap_checks=True) > 0
        pred[mask] = BONES[bone]
    return {b: float(2 * ((pred == v) & (truth == v)).sum() / max((pred == v).sum() + (truth == v).sum(), 1))
            for b, v in BONES.items()}


@pytest.fixture(scope="module")
def sent(tmp_path_factory):
    """Foreign cases sent to a node as installed (gate with its augmented pass, policy hold)."""
    from inference.phantom_io import write_dicom_series
    from inference.synth.foreign import make_case

    tmp = tmp_path_factory.mktemp("foreign")
    pacs = PacsSCP(tmp / "pacs")
    node = NodeProcess(tmp, pacs, tta=True)
    cases = []
    try:
        for seed in range(SEED, SEED + N_CASES):
            # issue 16's bar was set and met when this family's pelvis included the sacrum; the node's PELVIS
            # is now the two hip bones (the image is the same): both truths are scored, the bar on the old one
            ph = make_case(seed, sacrum_is_pelvis=True)
            hip_bones = make_case(seed).labels
            paths = write_dicom_series(ph, tmp / f"fo{seed}", patient_id=f"FO{seed}", seed=seed)
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
            assert storescu(node.port, tmp / f"fo{seed}").returncode == 0
            cases.append((seed, headers[0].SeriesInstanceUID, [d.SOPInstanceUID for d in headers], ph.labels,
                          hip_bones))
        for _, series_uid, *_ in cases:
            node.wait_job(series_uid, states=("review", "done", "failed", "skipped"), timeout=600)
        yield node, pacs, cases
    finally:
        node.stop()
        pacs.stop()


def test_the_foreign_result_is_held_until_approved_then_its_seg_scores_as_evaluated(sent):
    node, pacs, cases = sent
    for seed, series_uid, uids, truth, hip_bones in cases:
        job = job_of(node, series_uid)
        # the lower pelvis is missed in both passes (README): the anatomy check must hold it, unsent
        assert job["state"] == "review" and job["quality"] == "fail", job
        pelvis = [
            q for q in job["quality_checks"] if q["structure"].upper().startswith("PELVIS") and q["verdict"] == "fail"
        ]
        assert pelvis and "lower pelvis looks missing" in pelvis[0]["reason"], job["quality_checks"]
        assert seg_at(pacs, series_uid) is None
        r = node.cli("approve", str(job["job"]), "--reason", "acceptance test: scored below")
        assert r.returncode == 0, r.stderr
        # read the PACS's files only once the node has its answer: storescp answers after the file is written
        wait_for(lambda: any(d["ok"] for d in job_of(node, series_uid)["deliveries"]),  # noqa: B023  # waited on now
                 180, 0.5, f"the delivery of case {seed}")
        seg = seg_at(pacs, series_uid)
        dice = bone_dice(seg, uids, truth)
        mean3 = (dice["FEMUR"] + dice["TIBIA"] + dice["PELVIS"]) / 3
        print(f"fo{seed:05d} through the node: " + " / ".join(f"{b.lower()} {d:.3f}" for b, d in dice.items())
              + f"; mean femur/tibia/pelvis {mean3:.3f}; pelvis as hip bones only "
              f"{bone_dice(seg, uids, hip_bones)['PELVIS']:.3f}")
        # issue 16's bar (a) on the stand-in: mean of femur, tibia and pelvis >= 0.85, fibula >= 0.70;
        # measured through the node for seeds 500-503 (fp32 CPU): 0.854-0.865, fibula 0.879-0.952 (README)
        assert mean3 >= 0.85 and dice["FIBULA"] >= 0.70, dice
    assert sum(1 for p in pacs.files() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG") == len(cases)
