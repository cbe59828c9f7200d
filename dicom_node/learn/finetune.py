"""A candidate model fine-tuned from the serving one on the radiologists' corrections.

Each trainable correction gives a source volume (the stored instances its ``.npz`` names, loaded as the
worker loads a series) and its labels on that grid. Slices are prepared by the very functions inference uses
(``inference.training.prepare_case``: orientation, the card's intensity normalisation, padding and resizing to
the card's input size), so the network is trained on what it will be fed. The loss is the published recipe's
Dice + focal plus the keep-teacher KL of ``inference.synth.train`` (learning without forgetting): on slices that
show none of the structures the serving model got wrong, the candidate is held to the serving model's output,
so a few corrected studies teach it what was wrong without making it forget what was right. The structures
"got wrong" are read from the corrections' own scores (what the node sent against what the radiologist saved,
``Correction.metrics``); a structure without a score is treated as wrong (free to learn).

Adam with a linear warm-up and a cosine decay over the wall-clock budget (``[learning] minutes``), or over a
fixed number of steps (``max_steps``: the same seed then gives the same weights on the CPU).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference import augment
from inference.dataset import Case
from inference.model import build_network, native_bf16_cpu, pick_device
from inference.model_card import ModelCard, load_checkpoint, save_checkpoint
from inference.synth.train import keep_teacher_loss
from inference.training import dice_focal_loss, prepare_case
from storage.models import Correction, Instance

log = logging.getLogger("dicom_node.learn.finetune")

#: a structure the serving model scored at least this on every training correction is "right": slices
#: showing only such structures (or none) are held to the serving model's output
KEEP_DICE = 0.90


def cpu_threads() -> int:
    """Threads for torch on the CPU: every core, unless OMP_NUM_THREADS says otherwise (an admin sharing the
    machine with the node's own processes, or a test run whose workers already fill the cores)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


@dataclass
class Recipe:
    """The fine-tune's settings; the defaults are the ones measured in docs/learning.md."""

    lr: float = 2e-4
    warmup: int = 10
    batch_size: int = 4
    #: train on random square crops of this size of the input (0: whole slices); inference stays whole-slice.
    #: Measured: 128² crops lost whole structures on an unseen study (the Dice term of a crop that shows one bone
    #: pushes the others down everywhere); whole slices did not (docs/learning.md)
    crop: int = 0
    keep_teacher: float = 0.5
    focal_gamma: float = 2.0
    aug_scale: tuple[float, float] = (0.85, 1.2)
    aug_rotation_deg: float = 10.0
    #: share of each batch drawn from slices that show a structure, one structure at a time (the rest uniformly)
    foreground: float = 1.0
    #: keep batch-norm statistics at the serving model's: a few studies in batches of a handful of crops
    #: would otherwise replace them with their own in a hundred steps, and every other image pays for it
    freeze_bn: bool = True
    seed: int = 0

    def describe(self) -> str:
        return (f"Adam lr={self.lr}, warm-up {self.warmup} steps, cosine; batch {self.batch_size}, crops "
                f"{self.crop or 'none'}; dice + focal (gamma {self.focal_gamma}) + {self.keep_teacher} x KL to "
                f"the serving model on slices without a structure it got wrong; augmentation scale "
                f"{self.aug_scale[0]}-{self.aug_scale[1]}, rotation {self.aug_rotation_deg} deg, intensity; "
                f"{self.foreground:.2f} of each batch from slices with bone, balanced by structure; batch-norm "
                f"{'frozen' if self.freeze_bn else 'trained'}; seed {self.seed}")


@dataclass
class TrainingCase:
    correction_id: int
    x: torch.Tensor  # (n, 1, S, S) float16, as inference sees the slices
    y: torch.Tensor  # (n, S, S) uint8 on the model grid


@dataclass
class FinetuneResult:
    path: Path
    card: ModelCard
    steps: int
    minutes: float
    free_classes: tuple[int, ...]
    losses: list[float] = field(default_factory=list)


class CorrectionDataError(ValueError):
    """A correction's labels or source images cannot be read (the message says which and why)."""


def load_correction(c: Correction, instances_by_uid: dict[str, Instance], resolve) -> tuple[object, np.ndarray]:
    """The source volume (``dicom_node.infer.volume.SeriesVolume``) and the label volume of one correction.

    ``resolve`` turns a path stored relative to the data folder into a file (``FileStore.resolve``: it refuses a
    path that leaves the folder); ``instances_by_uid`` the stored source instances by SOP Instance UID.
    """
    from dicom_node.infer.volume import load_series

    if not c.labels_path:
        raise CorrectionDataError(f"correction {c.id} has no labels file")
    try:
        with np.load(resolve(c.labels_path), allow_pickle=False) as z:
            classes = np.asarray(z["classes"], dtype=np.uint8)
            uids = [str(u) for u in z["sop_uids"]]
    except (OSError, KeyError, ValueError) as exc:
        raise CorrectionDataError(f"correction {c.id}: labels file unreadable ({type(exc).__name__})") from exc
    missing = [u for u in uids if u not in instances_by_uid]
    if missing:
        raise CorrectionDataError(f"correction {c.id}: {len(missing)} of its {len(uids)} source images are no longer "
                                  "stored")
    instances = [instances_by_uid[u] for u in uids]
    if any(not i.path for i in instances):
        raise CorrectionDataError(f"correction {c.id}: source images were purged")
    vol = load_series(instances, resolve)
    if vol.array.shape != classes.shape:
        raise CorrectionDataError(f"correction {c.id}: labels {classes.shape} do not match the source volume "
                                  f"{vol.array.shape}")
    return vol, classes


def prepare(vol, classes: np.ndarray, card: ModelCard, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction's slices on the model grid, by the inference path (``prepare_case``)."""
    sp = (float(vol.pixel_spacing[1]), float(vol.pixel_spacing[0]), float(vol.slice_spacing))
    case = Case(name, vol.array, classes, sp, tuple(vol.row_dir), tuple(vol.col_dir))
    return prepare_case(case, card.input_size, card.normalisation)


def free_classes(corrections: list[Correction], card: ModelCard) -> tuple[int, ...]:
    """Class values the serving model got wrong on some training correction (Dice < KEEP_DICE, or unscored)."""
    free = []
    for lab in card.labels:
        key = lab.name.lower()
        scores = []
        for c in corrections:
            try:
                m = json.loads(c.metrics or "{}")
            except ValueError:
                m = {}
            d = m.get(key, {}).get("dice") if isinstance(m.get(key), dict) else None
            if d is not None:
                scores.append(float(d))
        if not scores or min(scores) < KEEP_DICE:
            free.append(lab.value)
    return tuple(free)


def _lr(recipe: Recipe, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(recipe.warmup, 1))
    return max(recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))), recipe.lr * 0.02)


def finetune(parent: Path, cases: list[TrainingCase], out: Path, *, version: str, parent_version: str,
             minutes: float, device: str = "auto", recipe: Recipe | None = None, max_steps: int = 0,
             free: tuple[int, ...] = (), threads: int = 0, precision: str = "auto") -> FinetuneResult:
    """Fine-tune ``parent`` on ``cases`` and write the candidate (weights + card) to ``out``.

    The budget is ``minutes`` of wall clock for the training loop, or exactly ``max_steps`` steps when given
    (reproducible); ``free``: class values not held to the teacher (see :func:`free_classes`). ``precision``:
    the forward pass's autocast, ``auto`` (bf16 where the hardware has it), ``fp32`` or ``bf16``.
    """
    r = recipe or Recipe()
    if not cases:
        raise ValueError("nothing to train on")
    torch.manual_seed(r.seed)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or cpu_threads())
    state, card = load_checkpoint(parent)
    net = build_network(card)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net = net.to(dev).to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(net).eval().requires_grad_(False) if r.keep_teacher > 0 else None
    xs = torch.cat([c.x for c in cases])
    ys = torch.cat([c.y for c in cases])
    # slices showing each structure: the bone-showing share of a batch picks a structure first, then a slice
    # with it, so a structure seen on few slices (the pelvis of a whole-leg series) is learnt as often as the rest
    flat = ys.flatten(1)
    by_class = [idx for v in range(1, card.num_classes) if len(idx := (flat == v).any(1).nonzero()[:, 0])]
    n, size = xs.shape[0], xs.shape[-1]
    opt = torch.optim.Adam(net.parameters(), lr=r.lr)
    gen = torch.Generator().manual_seed(r.seed)
    # bf16 autocast where the hardware has it (CUDA; CPUs with AVX512-BF16 or AMX): ~1.8x the steps of float32
    # in the same minutes on such a CPU (docs/learning.md), weights and optimiser float32 either way
    amp = precision == "bf16" or (precision == "auto" and (dev.type == "cuda" or native_bf16_cpu()))
    budget = minutes * 60.0
    t0 = time.perf_counter()
    step, losses = 0, []
    net.train()
    if r.freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    while True:
        elapsed = time.perf_counter() - t0
        if (max_steps and step >= max_steps) or (not max_steps and elapsed >= budget):
            break
        progress = step / max_steps if max_steps else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = _lr(r, step, progress)
        k_fg = int(round(r.foreground * r.batch_size)) if by_class else 0
        picks = [by_class[int(c)] for c in torch.randint(0, len(by_class), (k_fg,), generator=gen)] if k_fg else []
        idx = torch.cat([torch.stack([p[int(torch.randint(0, len(p), (1,), generator=gen))] for p in picks])
                         if picks else torch.zeros(0, dtype=torch.long),
                         torch.randint(0, n, (r.batch_size - k_fg,), generator=gen)])
        x = xs[idx].float().to(dev)
        y = ys[idx].long().to(dev)
        x, y = augment.spatial(x, y, gen, scale=r.aug_scale, rot_deg=r.aug_rotation_deg)
        x = augment.intensity(x, gen)
        if r.crop and r.crop < size:
            i, j = (int(v) for v in torch.randint(0, size - r.crop + 1, (2,), generator=gen))
            x, y = x[:, :, i:i + r.crop, j:j + r.crop], y[:, i:i + r.crop, j:j + r.crop]
        x = x.expand(-1, card.in_channels, -1, -1).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = dice_focal_loss(logits, y, r.focal_gamma)
        if teacher is not None:
            # the teacher runs only on the slices keep_teacher_loss holds to it (the frozen network is in eval
            # mode, so each slice's output is its own): on the CPU that pass is a third of a step
            held = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
            for k in free:
                held &= ~(y == k).flatten(1).any(1)
            t_logits = torch.zeros_like(logits, dtype=torch.float32)
            if held.any():
                with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    t_logits[held] = teacher(x[held]).float()
            loss = loss + r.keep_teacher * keep_teacher_loss(logits, t_logits, y, free)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(round(float(loss.item()), 4))
        if step % 20 == 0:
            log.info("fine-tune step %d, %.1f min, loss %.4f", step, (time.perf_counter() - t0) / 60,
                     float(np.mean(losses[-20:])))
    took = (time.perf_counter() - t0) / 60
    names = {lab.value: lab.name for lab in card.labels}
    card.version = version
    card.checkpoint_sha256 = ""
    card.trained_on = (f"{parent_version} fine-tuned on {len(cases)} radiologist-corrected studies of this site "
                       "(learning round)")
    card.training = {
        "parent": parent_version,
        "corrections": [c.correction_id for c in cases],
        "recipe": r.describe(),
        "keep_teacher_free": [names[v] for v in free],
        "minutes": round(took, 2),
        "budget_minutes": minutes,
        "steps": step,
        "max_steps": max_steps,
        "device": str(dev),
        "autocast": "bf16" if amp else "fp32",
        "date": _dt.date.today().isoformat(),
        "slices": int(n),
    }
    card.metrics = {}
    save_checkpoint(out, net.state_dict(), card, half=True)
    return FinetuneResult(out, card, step, took, free, losses)
