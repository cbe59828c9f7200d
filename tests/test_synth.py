"""Mechanics of the domain-randomised generator, the foreign test family and the synthetic trainer (tiny sizes)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.synth import labelmap
from inference.synth import labels as L
from inference.synth.render import LabelBank, RenderConfig, render_batch

ROOT = Path(__file__).resolve().parents[1]

#: every randomisation off: the image is each label's mean, placed exactly where the label is
PLAIN = RenderConfig(size=32, bone_fraction=0.0, zoom=(1.0, 1.0), rotation_deg=0.0, stretch=0.0, shear=0.0, shift=0.0,
                     elastic=0.0, flip=0.0, share_t1=0.0, share_water=0.0, std_max=0.0, thickness_mm=(0.01, 0.01),
                     res_factor=(1.0, 1.0), bias_max=0.0, gamma_sd=0.0, noise_max=0.0, ghost_p=0.0, pad_p=0.0,
                     hi_jitter=0.0)


def stripes() -> LabelBank:
    """One 32×32 slice with every generation label as a 1–2 column stripe, left to right."""
    sl = (np.arange(32)[None, :].repeat(32, 0) * L.N_GEN // 32).astype(np.uint8)
    return LabelBank.from_maps([np.stack([sl, sl])])


def test_label_maps_map_to_the_five_classes_and_are_seeded():
    vol, meta = labelmap.generate(3, size=48, region="full")
    assert vol.dtype == np.uint8 and vol.max() < L.N_GEN and vol.shape[1:] == (48, 48)
    present = set(np.unique(vol).tolist())
    # the anatomy's own sub-labels (objects and vessels are optional)
    for lab in (L.SKIN, L.FAT, L.SEPTUM, L.FLUID, L.OTHER_CORTEX, *L.CORTICES, *L.MARROWS):
        assert lab in present, L.NAMES[lab]
    assert len(present & set(L.MUSCLES)) >= 3
    assert set(np.unique(L.CLASS_OF[vol]).tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(labelmap.generate(3, size=48, region="full")[0], vol)
    assert not np.array_equal(labelmap.generate(4, size=48, region="full")[0][:10], vol[:10])
    # superior slices first: pelvis is found above the femur, the femur above the tibia
    first = {c: int(np.argmax((L.CLASS_OF[vol] == c).any(axis=(1, 2)))) for c in (1, 2, 4)}
    assert first[4] < first[1] < first[2]


def test_partial_fields_of_view():
    pelvis = L.CLASS_OF[labelmap.generate(5, size=32, region="pelvis")[0]]
    calf = L.CLASS_OF[labelmap.generate(5, size=32, region="calf")[0]]
    assert 4 in pelvis and 2 not in pelvis and 3 not in pelvis
    assert 2 in calf and 3 in calf and 4 not in calf


def test_pelvic_tubes_are_solid_round_upright_and_long_across():
    c = np.arange(-30, 30.01, 0.5)
    X, Y = np.meshgrid(c, c)
    lab = np.zeros(X.shape, np.uint8)
    labelmap._tube(lab, X, Y, 0.0, ((0, 0, 10), (0, 0, 0), (0, 0, -10)), (5.0, 5.0), 1.0)  # upright, like an ischium
    area = (L.CLASS_OF[lab] == 4).sum() * 0.25
    assert abs(area - np.pi * 25) < 8 and lab[60, 60] == L.PELVIS_MARROW and lab[60, 60 + 9] == L.PELVIS_CORTEX
    across = np.zeros(X.shape, np.uint8)  # lying across, like a pubic ramus: a long section
    labelmap._tube(across, X, Y, 0.0, ((-20, 0, 0), (0, 0, 0), (20, 0, 0)), (3.0, 3.0), 1.0)
    ys, xs = np.nonzero(across)
    assert np.ptp(c[xs]) > 40 and np.ptp(c[ys]) <= 6
    above = np.zeros(X.shape, np.uint8)
    labelmap._tube(above, X, Y, 4.0, ((-20, 0, 0), (0, 0, 0), (20, 0, 0)), (3.0, 3.0), 1.0)
    assert not above.any()


def test_some_bodies_have_a_solid_ischium_beside_the_femur():
    """The ischial tuberosity is solid bone medial to the femur, below the femoral head: a drawing the model
    must label pelvis (a model that only saw the thin obturator ring called it femur)."""
    seed = next(k for k in range(50) if (b := labelmap.random_body(np.random.default_rng(k))).p["pelvis_tubes"]
                and not b.p["pelvis_ring"])
    b = labelmap.random_body(np.random.default_rng(seed))
    z = b.z_hip + b.p["pelvis_tubes"]["isch_bot"][2] + 5 * b.s
    c = np.arange(-250, 250, 1.0)
    X, Y = np.meshgrid(c, c)
    cls = L.CLASS_OF[labelmap.slice_labels(b, z, X, Y)]
    for sg in b.legs:
        side = (X * sg > 0)
        femur_x = np.abs(X[(cls == 1) & side]).mean()
        pelvis_x = np.abs(X[(cls == 4) & side])
        assert pelvis_x.size > np.pi * (8 * b.s) ** 2 and pelvis_x.mean() < femur_x


def test_every_sub_label_gets_its_own_random_intensity():
    bank = stripes()
    cols = (np.arange(L.N_GEN) * 32 + 31) // L.N_GEN  # first column of each stripe
    x1, y1 = render_batch(bank, 1, torch.Generator().manual_seed(1), PLAIN, idx=torch.tensor([0]))
    x2, _ = render_batch(bank, 1, torch.Generator().manual_seed(2), PLAIN, idx=torch.tensor([0]))
    v1, v2 = x1[0, 0, 5, cols], x2[0, 0, 5, cols]
    assert len(torch.unique(v1)) == L.N_GEN  # every label its own grey level
    assert not torch.allclose(v1, v2, atol=0.05)  # and another draw, another contrast
    assert torch.equal(y1[0, 5, cols], torch.from_numpy(L.CLASS_OF[np.arange(L.N_GEN)]).long())
    assert torch.equal(x1[0, 0], x1[0, 1]) and torch.equal(x1[0, 0], x1[0, 2])  # grey -> 3 channels


def test_render_is_seeded_varies_and_flips():
    maps = [labelmap.generate(s, size=32)[0] for s in (1, 2)]
    bank = LabelBank.from_maps(maps)
    cfg = RenderConfig(size=32)
    a = render_batch(bank, 4, torch.Generator().manual_seed(7), cfg)
    b = render_batch(bank, 4, torch.Generator().manual_seed(7), cfg)
    c = render_batch(bank, 4, torch.Generator().manual_seed(8), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (4, 3, 32, 32) and float(a[0].min()) >= 0 and float(a[0].max()) <= 1
    assert set(torch.unique(a[1]).tolist()) <= {0, 1, 2, 3, 4}
    idx = torch.tensor([int(torch.nonzero(bank.bone)[0])])
    _, y0 = render_batch(bank, 1, torch.Generator().manual_seed(3), PLAIN, idx=idx)
    _, yf = render_batch(bank, 1, torch.Generator().manual_seed(3), replace(PLAIN, flip=1.0), idx=idx)
    assert y0.sum() > 0 and torch.equal(yf, y0.flip(-1))


def test_padding_blanks_image_and_labels_outside_the_field_of_view():
    bank = stripes()
    x, y = render_batch(bank, 8, torch.Generator().manual_seed(0), replace(PLAIN, pad_p=1.0), idx=torch.zeros(8).long())
    assert float(x[:, :, 0].abs().max()) == 0 and int(y[:, 0].max()) == 0 and int(y[:, 16].max()) > 0


def test_foreign_family_writes_an_evaluable_case(tmp_path):
    from inference.dataset import list_cases, load_case
    from inference.synth.foreign import write_dataset

    names = write_dataset(tmp_path, 1, seed=11, coarsen=4)
    assert list_cases(tmp_path) == names
    case = load_case(tmp_path, names[0])
    assert case.image.shape == case.labels.shape and case.image.shape[0] >= 25
    assert set(np.unique(case.labels).tolist()) == {0, 1, 2, 3, 4}
    assert 4.8 <= case.spacing[0] <= 7.2 and 20 <= case.spacing[2] <= 32  # 4× the 1.2–1.8 mm / 5–8 mm ranges


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pydicom', 'highdicom', 'SimpleITK', 'sqlalchemy'):
            raise ImportError('blocked on the GPU machine: ' + name)
sys.meta_path.insert(0, Block())
from inference.synth.train import main
main(sys.argv[1:])
"""


def test_two_training_steps_write_a_checkpoint_the_predictor_loads(tmp_path):
    """Runs as the GPU command does, with pydicom/SimpleITK/highdicom/sqlalchemy made unimportable."""
    from inference.model_card import read_card
    from inference.phantom import small_series
    from inference.predict import Predictor

    out, exp = tmp_path / "run", tmp_path / "export"
    r = subprocess.run([sys.executable, "-c", BLOCK, "--out", out, "--export", exp, "--maps", "2", "--val-maps", "1",
                        "--map-size", "32", "--input-size", "32", "--batch-size", "2", "--max-steps", "2",
                        "--val-every", "2", "--val-batches", "1", "--val-classic", "1", "--classic-size", "32",
                        "--export-which", "last", "--workers", "1", "--threads", "2", "--split-mb", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    best = out / "best.safetensors"
    card = read_card(best)
    assert card.version == "0.2.0" and "domain-randomised" in card.trained_on and card.training["steps"] == 2
    assert set(card.metrics["val_classic_dice"]) == {"FEMUR", "TIBIA", "FIBULA", "PELVIS"}
    # the GPU command's export: the last checkpoint (one fits what a GPU call brings back), both sha256s
    last = (out / "last.safetensors").read_bytes()
    parts = sorted(exp.glob("*.part*"))
    assert [p.name.split(".")[0] for p in parts] == ["last"] * 3 and b"".join(p.read_bytes() for p in parts) == last
    history = json.loads((exp / "history.json").read_text())
    assert history["exported"] == "last" and history["sha256"] == hashlib.sha256(last).hexdigest()
    assert history["sha256_best"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert best.stat().st_size < 50e6  # float16 weights
    pred = Predictor(best, device="cpu", precision="fp32")
    ph = small_series(seed=1, n_slices=2, size=32)
    assert pred.predict(ph.image, ph.geometry.row_dir, ph.geometry.col_dir).labels.shape == ph.image.shape


def test_mixed_classic_slices_are_mirrored_with_their_labels_and_replay_without_flips():
    from inference.synth.train import mix_classic

    ctx = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8)
    cty = (torch.arange(4 * 8 * 8) % 5).reshape(4, 8, 8)
    x, y = torch.zeros(6, 3, 8, 8), torch.zeros(6, 8, 8, dtype=torch.long)
    mix_classic(x, y, ctx, cty, 4, torch.Generator().manual_seed(1), flip=1.0)
    j = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x[:4, 0], ctx[j, 0].flip(-1)) and torch.equal(x[:4, 2], x[:4, 0])
    assert torch.equal(y[:4], cty[j].flip(-1)) and not x[4:].any()  # image and labels mirrored together
    # flip 0: the very draws of the recipe before --classic-flip existed (one randint, nothing else)
    g0, g1 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    mix_classic(x, y, ctx, cty, 4, g0, flip=0.0)
    torch.randint(0, 4, (4,), generator=g1)
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=g1))
    assert torch.equal(y[:4], cty[torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(2))])


def test_blending_two_checkpoints_interpolates_weights_and_refuses_other_networks(tmp_path):
    from inference.model_card import ModelCard, load_checkpoint, save_checkpoint
    from inference.synth.average import blend, main

    def make_card(version: str) -> ModelCard:
        return ModelCard(version=version, trained_on="test tensors", intended_use="a test")

    start, tuned, other = tmp_path / "start.safetensors", tmp_path / "tuned.safetensors", tmp_path / "o.safetensors"
    save_checkpoint(start, {"w": torch.zeros(3), "bn.running_var": torch.ones(2),
                            "bn.num_batches_tracked": torch.tensor(5)}, make_card("0.2.0"), half=False)
    save_checkpoint(tuned, {"w": torch.tensor([4.0, -4.0, 2.0]), "bn.running_var": torch.full((2,), 3.0),
                            "bn.num_batches_tracked": torch.tensor(9)}, make_card("0.3.0"), half=False)
    state, card = blend(start, tuned, 0.25)
    assert torch.allclose(state["w"], torch.tensor([1.0, -1.0, 0.5]))
    assert torch.allclose(state["bn.running_var"], torch.full((2,), 1.5))
    assert int(state["bn.num_batches_tracked"]) == 9  # integer buffers: the fine-tune's
    assert card.training["blend"]["alpha"] == 0.25 and "v0.2.0" in card.training["blend"]["start"]
    assert torch.equal(blend(start, tuned, 0.0)[0]["w"], torch.zeros(3))
    main([str(start), str(tuned), "--alpha", "1", "--out", str(tmp_path / "b.safetensors"), "--version", "9.9.9"])
    got, got_card = load_checkpoint(tmp_path / "b.safetensors")
    assert got_card.version == "9.9.9" and torch.equal(got["w"].float(), torch.tensor([4.0, -4.0, 2.0]))
    save_checkpoint(other, {"w": torch.zeros(4), "bn.running_var": torch.ones(2),
                            "bn.num_batches_tracked": torch.tensor(1)}, make_card("0.0.1"), half=False)
    with pytest.raises(ValueError, match="shape"):
        blend(start, other, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        blend(start, tuned, 1.5)


def test_keep_teacher_loss_holds_only_slices_without_the_free_classes():
    from inference.synth.train import keep_teacher_loss

    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(3, 5, 8, 8, generator=g)
    target = torch.zeros(3, 8, 8, dtype=torch.long)
    target[1, 2:4, 2:4] = 4  # slice 1 shows pelvis: free
    assert keep_teacher_loss(teacher.clone(), teacher, target, (4,)).item() == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone().requires_grad_(True)
    other = student.detach().clone()
    other[0] = torch.randn(5, 8, 8, generator=g)
    loss = keep_teacher_loss(student, other, target, (4,))
    assert loss.item() > 0.01
    loss.backward()
    assert student.grad[0].abs().sum() > 0 and not student.grad[1].any()  # the free slice is not held
    # moving only the free slice away from the teacher costs nothing
    moved = teacher.clone()
    moved[1] = torch.randn(5, 8, 8, generator=g)
    assert keep_teacher_loss(moved, teacher, target, (4,)).item() == pytest.approx(0.0, abs=1e-6)
    # every slice free: zero, and still a tensor that backpropagates
    target[:, 0, 0] = 4
    s2 = teacher.clone().requires_grad_(True)
    z = keep_teacher_loss(s2, torch.randn(3, 5, 8, 8, generator=g), target, (4,))
    z.backward()
    assert z.item() == 0.0 and s2.grad is not None


def test_the_mirrored_teacher_holds_no_left_right_bias():
    from inference.synth.train import teacher_log_probs

    class OneSided(torch.nn.Module):
        """Finds class 1 only in the image's left half: the bias a mirrored teacher must not pass on."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 2, *x.shape[2:])
            out[:, 1] = (x[:, 0] - 0.5) * 20
            out[:, 1, :, x.shape[-1] // 2:] = -10.0
            return out

    x = torch.zeros(1, 1, 4, 8)
    x[..., 1, 1] = x[..., 1, 6] = 1.0  # the same bone on both sides
    plain = teacher_log_probs(OneSided(), x, mirror=False).exp()[0, 1]
    both = teacher_log_probs(OneSided(), x, mirror=True).exp()[0, 1]
    assert plain[1, 1] > 0.99 and plain[1, 6] < 0.01  # one side found, the other missed
    assert float(both[1, 1]) == pytest.approx(float(both[1, 6]), abs=1e-6)  # mirrored: the same answer on both sides
    assert torch.allclose(both, both.flip(-1)) and not torch.allclose(plain, plain.flip(-1))
    total = teacher_log_probs(OneSided(), x, mirror=True).exp().sum(1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)  # still a distribution per pixel


def test_keep_teacher_needs_a_starting_checkpoint_and_known_classes(capsys):
    from inference.synth.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--keep-teacher", "1"])
    assert "--init-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--keep-teacher", "1", "--init-from", "w", "--teacher-free", "PELVIS,HIP"])
    assert "HIP" in capsys.readouterr().err
    a = parse_args(["--out", "x", "--keep-teacher", "1", "--init-from", "w", "--teacher-free", "PELVIS,FEMUR"])
    assert a.keep_teacher == 1.0
    with pytest.raises(SystemExit):  # a mirrored teacher with no teacher would be silently ignored
        parse_args(["--out", "x", "--mirror-teacher"])
    assert "--keep-teacher" in capsys.readouterr().err
    assert parse_args(["--out", "x", "--keep-teacher", "1", "--init-from", "w", "--mirror-teacher"]).mirror_teacher


def test_the_share_of_water_like_images_is_a_training_setting(capsys):
    """--share-water paints that share of training images as Dixon water (fat dark: mean 5-50 of 255); the
    stand-in's water pelvis is what the CPU fine-tunes learnt slowest (docs/model-data.md)."""
    from inference.synth.labels import FAT
    from inference.synth.render import _contrasts
    from inference.synth.train import parse_args

    a = parse_args(["--out", "x", "--share-water", "0.8", "--share-t1", "0.2"])
    assert (a.share_t1, a.share_water) == (0.2, 0.8)
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--share-water", "0.9"])  # with the default 0.2 T1-like: more than all
    assert "--share-water" in capsys.readouterr().err
    gen = torch.Generator().manual_seed(3)
    mean, _ = _contrasts(64, gen, RenderConfig(share_t1=0.0, share_water=1.0), "cpu")
    assert (mean[:, FAT] <= 50).all()
    mean, _ = _contrasts(64, gen, RenderConfig(share_t1=0.0, share_water=0.0), "cpu")
    assert (mean[:, FAT] > 50).sum() > 32  # fully random: U(0, 255)


def test_a_fine_tune_held_to_its_teacher_runs_and_records_it(tmp_path):
    from inference.model_card import read_card

    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK,
            "--out",
            out,
            "--init-from",
            ROOT / "inference/weights/demo-lower-limb.safetensors",
            "--keep-teacher",
            "1",
            "--maps",
            "2",
            "--val-maps",
            "1",
            "--map-size",
            "32",
            "--input-size",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--val-every",
            "2",
            "--val-batches",
            "1",
            "--val-classic",
            "0",
            "--workers",
            "1",
            "--threads",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    card = read_card(out / "last.safetensors")
    assert card.training["steps"] == 2 and "KL to the starting checkpoint" in card.training["keep_teacher"]
    assert "init_from" in card.training
