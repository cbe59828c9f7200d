"""Learning rounds (dicom_node/learn/rounds.py): the fixed hold-out, a round end to end on small phantoms, the
decision rule, promotion of winners only, and the CLI.

Corrections are written here directly (rows, ``.npz`` labels, stored source instances), as the intake stores
them, with the phantom's truth as the radiologist's labels: the round must not depend on how they arrived.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import load_settings
from dicom_node.learn import finetune as ft
from dicom_node.learn import registry
from dicom_node.learn.rounds import NO_CORRECTIONS, RoundError, _per_structure, decide, pair_absent, run_round
from dicom_node.receive.headers import to_meta
from dicom_node.slices import stack
from inference.phantom import small_series
from inference.phantom_io import write_dicom_series
from storage import holdout
from storage.db import Database
from storage.filestore import FileStore
from storage.instances import Recorder
from storage.models import Correction, Instance, ModelVersion
from storage.states import CorrectionState, ModelState

ROOT = Path(__file__).resolve().parents[1]


def _node(tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "node.toml").write_text(f'[node]\ndata_dir = "{tmp / "data"}"\n\n[learning]\nminutes = 0.5\n')
    settings = load_settings(tmp / "node.toml", environ={})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    db.create_schema(settings.data_dir)
    return settings, db, FileStore(settings.data_dir, fsync=False)


_received = [dt.datetime(2026, 12, 1, 8, 0)]


def add_correction(settings, db, store: FileStore, seed: int, state=CorrectionState.CORRECTED,
                   with_files: bool = True) -> int:
    """One corrected study: a small phantom stored as the listener stores it, and a correction whose labels are
    the phantom's truth on the stacked source grid. Without files: the row alone, its labels file named as the
    intake names one once written (a row without a name is still being written and counts for nothing)."""
    _received[0] += dt.timedelta(minutes=1)
    labels_path, series_id = f"corrections/c{seed}.npz", None
    if with_files:
        ph = small_series(seed=seed, n_slices=16, size=96)
        tmp = settings.data_dir.parent / f"src{seed}"
        paths = write_dicom_series(ph, tmp, seed=seed, patient_id=f"P{seed:06d}")
        rec = Recorder(db, root=settings.data_dir)
        slice_of = {}
        for k, p in enumerate(paths):
            ds = pydicom.dcmread(p)
            dest = store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
            rec.record(to_meta(ds), str(dest), dest.stat().st_size)  # the recorder stores it relative
            slice_of[str(ds.SOPInstanceUID)] = k
        with db.session() as s:
            insts = list(s.scalars(select(Instance).where(Instance.sop_uid.in_(list(slice_of)))))
        ordered, why = stack(insts)
        assert ordered is not None, why
        uids = [i.sop_uid for i in ordered]
        series_id = ordered[0].series_id
        npz = settings.data_dir / "corrections" / f"c{seed}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, classes=ph.labels[[slice_of[u] for u in uids]].astype(np.uint8),
                            sop_uids=np.array(uids))
        labels_path = store.relative(npz)
    with db.session() as s:
        c = Correction(sop_uid=generate_uid(), series_id=series_id, state=state, labels_path=labels_path,
                       received_at=_received[0], model_version="0.2.0", metrics="{}")
        s.add(c)
        s.flush()
        return c.id


def test_decision_rule_on_numbers():
    serving = {"femur": 0.90, "tibia": 0.90, "fibula": 0.80, "pelvis": 0.70}
    up = {"femur": 0.92, "tibia": 0.91, "fibula": 0.81, "pelvis": 0.85}
    assert decide(serving, up, 0).wins
    # a small loss within 0.02 is allowed when the mean rises
    assert decide(serving, {**up, "tibia": 0.885}, 0).wins
    # mean up but one structure down by 0.03
    d = decide(serving, {**up, "tibia": 0.87}, 0)
    assert not d.wins and "tibia down 0.030" in d.words
    # mean not up
    d = decide(serving, {k: v - 0.01 for k, v in serving.items()}, 0)
    assert not d.wins and "mean Dice not up" in d.words
    # better everywhere, but the gate lets a held-out result under 0.70 through
    d = decide(serving, up, 1)
    assert not d.wins and "gate lets through 1" in d.words
    # a structure the serving model found and the candidate no longer does
    assert not decide(serving, {k: v for k, v in up.items() if k != "fibula"}, 0).wins


def test_a_false_positive_stopped_counts_for_the_candidate():
    """The correction has no fibula: the serving model drew one (Dice 0), the candidate left it out as the
    radiologist did. That is the candidate getting the fibula right, not losing it."""
    serving = [{"correction": 1, "dice": {"femur": 0.9, "pelvis": 0.4, "fibula": 0.0}}]
    candidate = [{"correction": 1, "dice": {"femur": 0.91, "pelvis": 0.8}}]
    pair_absent(serving, candidate)
    s, c = _per_structure(serving), _per_structure(candidate)
    assert c["fibula"] == 1.0 and s["fibula"] == 0.0
    assert decide(s, c, 0).wins
    # the other way round: a candidate that draws a structure the correction does not have loses it
    serving = [{"correction": 1, "dice": {"femur": 0.9}}]
    candidate = [{"correction": 1, "dice": {"femur": 0.92, "tibia": 0.0}}]
    pair_absent(serving, candidate)
    d = decide(_per_structure(serving), _per_structure(candidate), 0)
    assert not d.wins and "tibia down 1.000" in d.words


def test_a_corrected_row_whose_labels_are_not_yet_written_is_left_to_the_next_round(tmp_path):
    """The intake records a corrected row with its scores, then writes its labels file and names it: a round
    in between neither holds it out nor trains on it (it would fail loading an unnamed file)."""
    settings, db, store = _node(tmp_path)
    cid = add_correction(settings, db, store, 1, with_files=False)
    with db.session() as s:
        s.get(Correction, cid).labels_path = ""
    assert holdout.assign(db, 0.2).version is None
    with db.session() as s:
        s.get(Correction, cid).labels_path = "corrections/c1.npz"
    assert holdout.assign(db, 0.2).held_out == [cid]


def test_holdout_is_fixed_and_versioned(tmp_path):
    settings, db, store = _node(tmp_path)
    first = [add_correction(settings, db, store, i, with_files=False) for i in range(3)]
    add_correction(settings, db, store, 90, state=CorrectionState.UNCHANGED, with_files=False)
    add_correction(settings, db, store, 91, state=CorrectionState.UNUSABLE, with_files=False)
    a = holdout.assign(db, 0.2)
    assert a.version == 1 and a.held_out == [first[-1]] and a.trainable == first[:2]  # the newest held out
    assert holdout.assign(db, 0.2).version is None  # nothing new: nothing moves
    more = [add_correction(settings, db, store, 10 + i, with_files=False) for i in range(7)]
    b = holdout.assign(db, 0.2)  # 10 in all: two held out, the earlier one stays
    assert b.version == 2 and b.held_out == [more[-1]] and b.trainable == more[:-1]
    assert [c.id for c in holdout.held_out(db)] == [first[-1], more[-1]]
    assert [c.id for c in holdout.trainable(db)] == first[:2] + more[:-1]
    with db.session() as s:
        rounds = {c.id: (c.holdout, c.holdout_round) for c in s.scalars(select(Correction))}
    assert rounds[first[-1]] == (True, 1) and rounds[first[0]] == (False, 1) and rounds[more[-1]] == (True, 2)
    assert all(r == (False, None) for i, r in rounds.items() if i not in first + more)  # never assigned
    # one correction alone is held out (nothing to train on yet); the second is trained on
    s2, db2, st2 = _node(tmp_path / "b")
    one = add_correction(s2, db2, st2, 1, with_files=False)
    assert holdout.assign(db2, 0.2).held_out == [one]
    two = add_correction(s2, db2, st2, 2, with_files=False)
    assert holdout.assign(db2, 0.2).trainable == [two]
    # new since a model: neither trained on nor held out by it
    assert len(holdout.new_since(db, "0.2.0")) == 10
    with db.session() as s:
        s.add(ModelVersion(version="0.2.0+site.1", path="x", sha256="0" * 64, parent="0.2.0",
                           trained_on=json.dumps(first[:2]), held_out=json.dumps([first[-1]])))
    assert [c.id for c in holdout.new_since(db, "0.2.0+site.1")] == more


def test_finetune_is_reproducible_on_cpu(tmp_path):
    from inference.model import BUNDLED_MODEL
    from inference.model_card import load_checkpoint, read_card

    settings, db, store = _node(tmp_path)
    cid = add_correction(settings, db, store, 3)
    with db.session() as s:
        c = s.get(Correction, cid)
        insts = {i.sop_uid: i for i in s.scalars(select(Instance))}
    card = read_card(BUNDLED_MODEL)
    vol, classes = ft.load_correction(c, insts, store.resolve)
    x, y = ft.prepare(vol, classes, card, "c")
    assert x.shape == (16, 1, 256, 256) and y.shape == (16, 256, 256) and int(y.max()) >= 1
    recipe = ft.Recipe(batch_size=2, crop=64)
    outs = []
    for k in range(2):
        r = ft.finetune(BUNDLED_MODEL, [ft.TrainingCase(cid, x, y)], tmp_path / f"c{k}.safetensors", version="9.9.9",
                        parent_version="0.2.0", minutes=5, max_steps=1, recipe=recipe, threads=2, device="cpu")
        outs.append(load_checkpoint(r.path)[0])
        assert r.steps == 1 and r.card.training["corrections"] == [cid] and r.card.version == "9.9.9"
        assert r.card.training["parent"] == "0.2.0" and r.card.training["recipe"]
    assert all(bool((outs[0][k] == outs[1][k]).all()) for k in outs[0])
    base = load_checkpoint(BUNDLED_MODEL)[0]
    assert any(not bool((outs[0][k] == base[k]).all()) for k in outs[0] if outs[0][k].is_floating_point())


def test_round_records_candidate_and_promotes_only_a_winner(tmp_path):
    settings, db, store = _node(tmp_path)
    with pytest.raises(RoundError, match="no corrections yet"):
        run_round(settings, db, max_steps=1)
    ids = [add_correction(settings, db, store, s) for s in (11, 12, 13)]
    # a recipe that wrecks the network (learning rate 0.05): it must lose, and --promote must not promote it
    wreck = ft.Recipe(lr=0.05, warmup=1, batch_size=2, crop=64)
    s1 = run_round(settings, db, promote=True, max_steps=2, recipe=wreck)
    assert s1["held_out"] == [ids[-1]] and s1["trained_on"] == ids[:2]
    assert s1["held_out_count"] == 1 and s1["trained_on_count"] == 2 and s1["steps"] == 2
    assert "femur" in s1["dice"]["serving"] and s1["mean_dice"]["serving"] > 0.5
    assert not s1["wins"] and not s1["promoted"] and "loses" in s1["decision"]
    # the gate re-measured on the held-out results: right ones it would still hold, and by which check
    for which, cases in s1["cases"].items():
        for e in cases:
            assert e["good"] == all(v >= 0.85 for v in e["dice"].values())
            assert e["good_held"] == (e["good"] and e["verdict"] == "fail")
            assert bool(e["held_by"]) == (e["verdict"] == "fail"), e
        assert s1["gate"]["good_held"][which] == sum(e["good_held"] for e in cases) <= s1["gate"]["good"][which]
    assert s1["serving_version"] == "0.2.0" and s1["candidate_version"] == "0.2.0+site.1"
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == "0.2.0+site.1"))
        assert row.state == ModelState.REJECTED and row.parent == "0.2.0"
        assert json.loads(row.trained_on) == ids[:2] and json.loads(row.held_out) == [ids[-1]]
        assert json.loads(row.metrics)["dice"]["candidate"] == s1["dice"]["candidate"]
    assert registry.serving_checkpoint(settings, db)[0] == "0.2.0"
    assert (settings.data_dir / "models" / "0.2.0+site.1.safetensors").is_file()

    # a new correction: the hold-out stays as it was, the new one is trained on
    new = add_correction(settings, db, store, 14)
    gentle = ft.Recipe(lr=1e-5, warmup=1, batch_size=2, crop=64)
    s2 = run_round(settings, db, promote=True, max_steps=1, recipe=gentle)
    assert s2["held_out"] == [ids[-1]] and s2["trained_on"] == ids[:2] + [new]
    assert s2["newly_trainable"] == [new] and s2["hold_out_version"] == 2
    serving_now = registry.serving_checkpoint(settings, db)[0]
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == s2["candidate_version"]))
    if s2["wins"]:
        assert s2["promoted"] and serving_now == s2["candidate_version"] and row.state == ModelState.SERVING
    else:
        assert not s2["promoted"] and serving_now == "0.2.0" and row.state == ModelState.REJECTED


def test_cli_learn_without_corrections(tmp_path):
    settings, _db, _store = _node(tmp_path)
    p = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(tmp_path / "node.toml"), "learn",
                        "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout) == {"error": NO_CORRECTIONS}
    assert "docs/corrections.md" in p.stderr


def test_scheduled_round_is_a_locked_niced_child(tmp_path):
    import fcntl

    from dicom_node.scheduler import learning_command, run_learning_child

    settings, _db, _store = _node(tmp_path)
    cmd = learning_command(settings)
    assert cmd[:3] == [sys.executable, "-m", "dicom_node"] and cmd[-2:] == ["learn", "--json"]
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "node.toml")
    with open(settings.data_dir / "learning.lock", "a+") as held:  # a round is running: none starts beside it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_learning_child(settings) is None
