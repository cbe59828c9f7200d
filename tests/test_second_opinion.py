"""The gate's second augmented pass, in a real pipeline run (real model, SQLite, no network).

An augmented pass can itself be the wrong one (in the threshold bench: a thin distal tibia it lost, a sliver
at the scan's edge it read differently), which held good results for review. So when a structure disagrees
with the first augmented pass, the pipeline asks a second one (mirrored, the opposite gamma) and holds the
result only when that one disagrees too. Here the first augmented pass is made wrong on purpose (its tibia
removed); the model's own result and the second pass are real.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pydicom
from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.pipeline import Pipeline
from dicom_node.receive.headers import to_meta
from dicom_node.service import make_predictor
from storage import queue
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Job, QualityCheck
from storage.queue import Recorder

from conftest import write_series

TIBIA = 2


class FirstPassLosesTheTibia:
    """The real predictor, except that its first augmented pass has no tibia (calls are counted)."""

    def __init__(self, real, second: bool = True):
        self.real, self.second, self.augmented_calls = real, second, 0
        self.card, self.device = real.card, real.device

    def predict(self, *a, **kw):
        pred = self.real.predict(*a, **kw)
        if pred.tta_labels is not None:
            pred.tta_labels[pred.tta_labels == TIBIA] = 0
        return pred

    def augmented(self, *a, **kw):
        self.augmented_calls += 1
        out = self.real.augmented(*a, **kw)
        if not self.second:  # a second opinion that is as wrong as the first
            out[out == TIBIA] = 0
        return out


def run_one(tmp_path, seed: int, second_agrees: bool):
    settings = load_settings(None, environ={"DICOM_NODE_NODE_DATA_DIR": str(tmp_path / "var")})
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    _, paths = write_series(tmp_path / "s", seed=seed, n_slices=24, size=128)
    rec = Recorder(db)
    for p in paths:
        assert rec.record(to_meta(pydicom.dcmread(p, stop_before_pixels=True)), str(p), p.stat().st_size)
    time.sleep(0.05)
    (series_id,) = queue.stable_series(db, 0.01)
    job_id = queue.mark_judged(db, series_id, queue=True, reason="", expected_count=len(paths))
    predictor = FirstPassLosesTheTibia(make_predictor(settings), second=second_agrees)
    assert Pipeline(settings, db, FileStore(tmp_path / "var", fsync=False), lambda: predictor).run_next()
    with db.session() as s:
        job = s.get(Job, job_id)
        checks = {c.structure: (c.verdict, c.reason, json.loads(c.metrics))
                  for c in s.scalars(select(QualityCheck).where(QualityCheck.job_id == job_id))}
        return job.state, json.loads(job.timings), checks, predictor.augmented_calls


def test_a_second_pass_that_agrees_keeps_a_good_tibia_from_being_held(tmp_path):
    state, timings, checks, calls = run_one(tmp_path, 91, second_agrees=True)
    assert calls == 1  # asked once, because the first pass disagreed
    tibias = {k: v for k, v in checks.items() if k.startswith("TIBIA")}
    assert tibias, checks
    for name, (verdict, reason, metrics) in tibias.items():
        assert "unstable" not in reason and "a second augmented pass agrees" in reason, (name, reason)
        assert metrics["tta2_dice"] >= 0.88 and metrics["tta_dice"] == 0.0, metrics
    assert not any("unstable" in r for _, r, _ in checks.values()), checks
    assert timings["tta"] > 0


def test_a_tibia_both_passes_disagree_with_is_held(tmp_path):
    state, _, checks, calls = run_one(tmp_path, 91, second_agrees=False)
    assert calls == 1
    tibias = [v for k, v in checks.items() if k.startswith("TIBIA")]
    assert tibias and all(v == "fail" and "all 2 augmented passes" in r for v, r, _ in tibias), checks
    assert state == "review"


def test_the_second_pass_matches_the_first_on_an_ordinary_phantom(tmp_path):
    """The mirrored-back labels of Predictor.augmented land where the plain prediction's do."""
    from dicom_node.infer.volume import load_series
    from storage.models import Instance

    settings = load_settings(None, environ={"DICOM_NODE_NODE_DATA_DIR": str(tmp_path / "var")})
    _, paths = write_series(tmp_path / "s", seed=92, n_slices=16, size=128)
    vol = load_series([Instance(path=str(p), frames=1) for p in paths])
    predictor = make_predictor(settings)
    plain = predictor.predict(vol.array, vol.row_dir, vol.col_dir).labels
    second = predictor.augmented(vol.array, vol.row_dir, vol.col_dir)
    for v in (1, 2, 3):
        a, b = plain == v, second == v
        if a.sum() > 100:
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, v
    assert second.shape == plain.shape and second.dtype == np.uint8
