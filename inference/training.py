"""Training on the published recipe: ResNet34 U-Net, 256² slices, Dice + focal loss, Adam 1e-4 with decay.

Everything a site needs to train its own model from its own DICOM/NIfTI data: case-level k-fold splits,
augmentation, early stopping on validation loss, checkpoints with their model card, resume after an
interruption, CPU or GPU (mixed precision on GPU). No weights are downloaded: a pretrained encoder comes
from a local file if given.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import augment
from .dataset import Case, list_cases, load_case, split_cases
from .model import build_network, pick_device
from .model_card import ModelCard, save_checkpoint
from .preprocessing import (
    body_box,
    intensity_range,
    labels_to_model_grid,
    orient,
    plan_transform,
    reaches_hips,
    to_model_input,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: Path
    out: Path
    encoder: str = "resnet34"
    architecture: str = "Unet"
    input_size: int = 256
    crop_size: int = 0  # train on random crops of the input (0 = whole slices); inference stays whole-slice
    batch_size: int = 16
    lr: float = 1e-4
    lr_decay: float = 0.98  # per epoch
    epochs: int = 100
    steps_per_epoch: int = 0  # 0 = one pass over the training slices
    patience: int = 10
    folds: int = 1
    fold: int = 0
    val_fraction: float = 0.2
    seed: int = 42
    device: str = "auto"
    encoder_weights: Path | None = None
    focal_gamma: float = 2.0
    half: bool = False  # store final weights in float16
    version: str = "0.1.0"
    trained_on: str = ""
    resume: bool = False
    init_from: Path | None = None  # start from this checkpoint's weights (fine-tuning, transfer)
    aug_scale: tuple[float, float] = (0.6, 1.6)
    aug_rotation_deg: float = 15.0
    threads: int = 0
    extra: dict = field(default_factory=dict)


def dice_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Soft Dice over foreground classes plus categorical focal loss, as in the published recipe."""
    c = logits.shape[1]
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, c).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    dice_loss = 1 - dice[1:].mean()
    logp = F.log_softmax(logits.float(), 1)
    logpt = logp.gather(1, target[:, None])[:, 0]
    focal = (-(1 - logpt.exp()) ** gamma * logpt).mean()
    return dice_loss + focal


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[float]:
    """Hard Dice per foreground class (nan where the class is absent from both)."""
    out = []
    for k in range(1, n_classes):
        p, t = pred == k, target == k
        s = p.sum().item() + t.sum().item()
        out.append(float("nan") if s == 0 else 2 * (p & t).sum().item() / s)
    return out


def prepare_case(case: Case, size: int, normalisation: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A case's slices on the model grid, exactly as inference sees them (the body's box included):
    (n,1,S,S) float16, (n,S,S) uint8."""
    image, labels = case.image, case.labels
    box = body_box(image, (case.spacing[1], case.spacing[0]))
    if box is not None and reaches_hips(labels):  # as predict_volume narrows: series that reach the hips
        image, labels = image[:, box[0], box[1]], labels[:, box[0], box[1]]
    n, rows, cols = image.shape
    t = plan_transform(rows, cols, case.row_dir, case.col_dir, size)
    img = orient(image, t)
    lo, hi = intensity_range(img, normalisation)
    x = to_model_input(img, lo, hi, t, in_channels=1).half()
    y = labels_to_model_grid(orient(labels, t), t).to(torch.uint8)
    return x, y


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _card(cfg: TrainConfig, train_names, val_names, best: dict) -> ModelCard:
    return ModelCard(
        architecture=cfg.architecture,
        encoder=cfg.encoder,
        in_channels=3,
        input_size=cfg.input_size,
        version=cfg.version,
        trained_on=cfg.trained_on or f"{len(train_names)} cases from {cfg.data.name}",
        intended_use="",
        training={
            "command": " ".join(sys.argv),
            "date": _dt.date.today().isoformat(),
            "train_cases": train_names,
            "val_cases": val_names,
            "loss": f"dice + categorical focal (gamma {cfg.focal_gamma:.1f})",
            "optimizer": f"Adam lr={cfg.lr} decay={cfg.lr_decay}/epoch",
            "batch_size": cfg.batch_size,
            "crop_size": cfg.crop_size,
            "seed": cfg.seed,
            "fold": f"{cfg.fold}/{cfg.folds}",
            **cfg.extra,
        },
        metrics=best,
    )


def train(cfg: TrainConfig) -> Path:
    """Train one fold; returns the path of the best checkpoint (by validation loss)."""
    _seed_all(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    names = list_cases(cfg.data)
    train_names, val_names = split_cases(names, cfg.folds, cfg.fold, cfg.seed, cfg.val_fraction)
    card = _card(cfg, train_names, val_names, {})
    log.info("train cases %s, validation cases %s, device %s", train_names, val_names, device)

    def load(names_):
        xs, ys = [], []
        for n in tqdm(names_, desc="loading cases", leave=False):
            x, y = prepare_case(load_case(cfg.data, n, tuple(card.labels)), cfg.input_size, card.normalisation)
            xs.append(x)
            ys.append(y)
        return xs, ys

    tx, ty = load(train_names)
    vx, vy = load(val_names)
    train_x, train_y = torch.cat(tx), torch.cat(ty)
    n_slices = train_x.shape[0]
    steps = cfg.steps_per_epoch or max(1, n_slices // cfg.batch_size)

    net = build_network(card, cfg.encoder_weights)
    if cfg.init_from is not None:
        from .model_card import load_checkpoint

        state, init_card = load_checkpoint(cfg.init_from)
        if ((init_card.architecture, init_card.encoder, init_card.num_classes)
                != (card.architecture, card.encoder, card.num_classes)):
            raise ValueError(f"--init-from {cfg.init_from}: a {init_card.architecture}/{init_card.encoder} with "
                             f"{init_card.num_classes} classes cannot start a {card.architecture}/{card.encoder} "
                             f"with {card.num_classes}")
        net.load_state_dict({k: v.float() for k, v in state.items()})
        card.training["init_from"] = f"{cfg.init_from.name} (v{init_card.version})"
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, best_loss, stale, history = 0, float("inf"), 0, []
    cfg.out.mkdir(parents=True, exist_ok=True)
    state_path = cfg.out / "train_state.pt"
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        start_epoch, best_loss, stale, history = st["epoch"] + 1, st["best_loss"], st["stale"], st["history"]
        log.info("resumed after epoch %d (best validation loss %.4f)", st["epoch"], best_loss)
    amp = device.type == "cuda"
    best_path = cfg.out / "best.safetensors"

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        run_loss = 0.0
        for step in bar:
            idx = torch.randint(0, n_slices, (cfg.batch_size,), generator=gen)
            x = train_x[idx].float().to(device)
            y = train_y[idx].long().to(device)
            x, y = augment.spatial(x, y, gen, scale=cfg.aug_scale, rot_deg=cfg.aug_rotation_deg)
            x = augment.intensity(x, gen)
            if cfg.crop_size and cfg.crop_size < cfg.input_size:
                cs = cfg.crop_size
                i, j = (int(v) for v in torch.randint(0, cfg.input_size - cs + 1, (2,), generator=gen))
                x, y = x[:, :, i:i + cs, j:j + cs], y[:, i:i + cs, j:j + cs]
            x = x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            loss = dice_focal_loss(logits, y, cfg.focal_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item()
            bar.set_postfix(loss=f"{run_loss / (step + 1):.4f}")
        sched.step()
        val_loss, val_dice = evaluate_slices(net, vx, vy, device, card.num_classes, cfg.focal_gamma)
        rec = {"epoch": epoch + 1, "train_loss": run_loss / steps, "val_loss": val_loss,
               "val_dice": dict(zip([lab.name for lab in card.labels], val_dice)), "lr": opt.param_groups[0]["lr"]}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        monitor = val_loss if vx else rec["train_loss"]
        if monitor < best_loss:
            best_loss, stale = monitor, 0
            card.metrics = {"best_epoch": epoch + 1, "val_loss": val_loss, "val_dice": rec["val_dice"]}
            save_checkpoint(best_path, net.state_dict(), card, half=cfg.half)
        else:
            stale += 1
        save_checkpoint(cfg.out / "last.safetensors", net.state_dict(), card)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                    "best_loss": best_loss, "stale": stale, "history": history,
                    "config": {k: str(v) for k, v in asdict(cfg).items()}},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
        (cfg.out / "history.json").write_text(json.dumps(history, indent=1))
        if stale >= cfg.patience:
            log.info("early stop: validation loss has not improved for %d epochs", stale)
            break
    return best_path


@torch.inference_mode()
def evaluate_slices(net, xs: list[torch.Tensor], ys: list[torch.Tensor], device, n_classes: int, gamma: float,
                    batch: int = 32) -> tuple[float, list[float]]:
    """Validation loss and per-class Dice over whole validation cases (on the model grid)."""
    if not xs:
        return float("nan"), [float("nan")] * (n_classes - 1)
    net.eval()
    losses, dices = [], []
    for x, y in zip(xs, ys):
        preds = []
        for s in range(0, x.shape[0], batch):
            xb = x[s:s + batch].float().to(device).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                lg = net(xb)
            losses.append(dice_focal_loss(lg, y[s:s + batch].long().to(device), gamma).item())
            preds.append(lg.argmax(1).cpu())
        dices.append(dice_per_class(torch.cat(preds), y.long(), n_classes))
    net.train()
    return float(np.mean(losses)), [float(v) for v in np.nanmean(np.array(dices, dtype=float), axis=0)]
