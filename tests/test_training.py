"""Training, resume and evaluation mechanics on a handful of tiny phantom cases (not accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from inference.dataset import DatasetError, load_case, split_cases
from inference.model_card import ModelCardError, read_card
from inference.phantom import small_series
from inference.phantom_io import write_training_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for i, region in enumerate(("thigh-knee", "leg", "pelvis", "thigh-knee")):
        ph = small_series(seed=100 + i, n_slices=8, size=64, region=region, thickness=10.0)
        # half the cases as DICOM + per-bone masks (published layout), half as NIfTI + multi-class mask
        write_training_case(ph, root, f"c{i}", dicom=i % 2 == 0, nifti_image=i % 2 == 1,
                            per_bone=i % 2 == 0, multiclass=i % 2 == 1)
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dicom_node", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_train_resume_and_evaluate(dataset, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--data", dataset, "--out", out, "--input-size", "64", "--batch-size", "4",
              "--steps-per-epoch", "2", "--val-fraction", "0.25", "--seed", "3", "--threads", "2"]
    r = run_cli(*common, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 1 and np.isfinite(hist[0]["train_loss"])
    r = run_cli(*common, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after epoch 0" in r.stderr
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    card = read_card(out / "best.safetensors")
    assert card.encoder == "resnet34" and card.input_size == 64
    assert [lab.snomed_code for lab in card.labels] == ["71341001", "12611008", "87342007", "118645006"]
    assert len(card.training["val_cases"]) == 1 and set(card.training["train_cases"]).isdisjoint(
        card.training["val_cases"]
    )

    ev = tmp_path / "eval"
    r = run_cli("evaluate", "--model", out / "best.safetensors", "--data", dataset, "--out", ev, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((ev / "evaluation.json").read_text())
    assert len(rep["cases"]) == 4 and set(rep["summary"]) == {"FEMUR", "TIBIA", "FIBULA", "PELVIS", "mean"}
    assert "| femur |" in (ev / "evaluation.md").read_text()
    assert len(list(ev.glob("overlay_*.png"))) == 4


def test_splits_are_case_level_and_deterministic():
    names = [f"c{i}" for i in range(7)]
    tr, va = split_cases(names, folds=7, fold=3, seed=1)
    assert len(va) == 1 and set(tr) | set(va) == set(names) and not set(tr) & set(va)
    assert split_cases(names, 7, 3, 1) == (tr, va)
    folds = [split_cases(names, 7, f, 1)[1][0] for f in range(7)]
    assert sorted(folds) == names  # leave-one-out: each case validated once


def test_mask_geometry_mismatch_names_the_case(dataset, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(dataset, root)
    m = sitk.ReadImage(str(root / "FEMUR" / "FEMUR_c0.nii.gz"))
    m.SetSpacing((m.GetSpacing()[0] * 2, m.GetSpacing()[1], m.GetSpacing()[2]))
    sitk.WriteImage(m, str(root / "FEMUR" / "FEMUR_c0.nii.gz"))
    with pytest.raises(DatasetError, match=r"case c0: mask FEMUR/FEMUR_c0.nii.gz does not match the scan: spacing"):
        load_case(root, "c0")


def test_checkpoint_without_model_card_is_refused(tmp_path):
    p = tmp_path / "nocard.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ModelCardError, match="no model card"):
        read_card(p)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "var"\n[scp]\nport = 0\n[inference]\nmodel_path = "{p}"\n')
    r = run_cli("-c", cfg, "serve")
    assert r.returncode == 2 and "no model card" in r.stderr
