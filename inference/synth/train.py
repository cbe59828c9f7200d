"""Training on domain-randomised images drawn on the fly from random label maps (``python -m inference.synth.train``).

Why a separate entry point: the site-data trainer (``inference.training``) reads fixed cases from disk;
here every batch is new — N label maps are generated up front (in parallel, numpy only), kept on the
device as one uint8 tensor, and each step renders a fresh randomised batch there. Network, loss, model
card and checkpoint format are those of ``inference.training`` / ``model`` / ``model_card``, so the
result is an ordinary checkpoint the node loads. The run is bounded by wall-clock (``--minutes``), with a
cosine learning-rate decay over that budget, and keeps the checkpoint that scores best on validation:
a few held-out randomised batches and a few classic phantoms (``inference.phantom``), never the foreign
family (``inference.synth.foreign``), which stays an independent test.

Imports nothing from pydicom, highdicom, SimpleITK or SQLAlchemy, so it runs on a bare GPU machine with
torch, numpy, scipy, safetensors and segmentation-models-pytorch.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from inspect import signature
from pathlib import Path

import numpy as np
import torch

from ..dataset import Case
from ..model import build_network, native_bf16_cpu, pick_device
from ..model_card import ModelCard, load_checkpoint, save_checkpoint
from ..training import dice_focal_loss, dice_per_class, evaluate_slices, prepare_case
from . import labelmap
from .render import LabelBank, RenderConfig, render_batch

log = logging.getLogger("inference.synth.train")
CLASS_NAMES = ("FEMUR", "TIBIA", "FIBULA", "PELVIS")


def _one_map(args: tuple[int, int, str | None, str, str | None, bool]) -> np.ndarray:
    seed, size, region, generator, cache, sacrum_is_pelvis = args
    # labelmap maps name their pelvis definition: a cache made before the sacrum left the pelvis must not be
    # read back as the new one (realshape maps always drew it as background)
    kind = generator if generator != "labelmap" else f"labelmap-{'sacrum' if sacrum_is_pelvis else 'hipbones'}"
    name = f"{kind}-{seed}-{size}-{region or 'any'}.npy"
    path = Path(cache) / name if cache else None
    if path is not None and path.exists():
        return np.load(path)
    if generator == "realshape":
        from . import realshape

        vol = realshape.generate(seed, size=size, region=region)[0]
    else:
        # a labelmap.py checked out from before 2026-12-07 (v0.2.0's recipe, docs/model.md) has no such choice:
        # it always drew the sacrum as pelvis
        kw = {"sacrum_is_pelvis": sacrum_is_pelvis} if "sacrum_is_pelvis" in signature(labelmap.generate).parameters \
            else {}
        vol = labelmap.generate(seed, size=size, region=region, **kw)[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.npy")
        np.save(tmp, vol)
        os.replace(tmp, path)
    return vol


def _one_classic(args: tuple[int, int, str, bool]):
    from ..phantom import small_series

    seed, size, region, sacrum_is_pelvis = args
    ph = small_series(seed=seed, n_slices=16, size=size, region=region, thickness=8.0,
                      sacrum_is_pelvis=sacrum_is_pelvis)
    return ph.image.astype(np.float32), ph.labels, ph.geometry.row_dir, ph.geometry.col_dir, ph.geometry.pixel_spacing


def make_maps(seeds: list[int], size: int, workers: int, regions: list[str | None] | None = None,
              generators: list[str] | None = None, cache: Path | None = None,
              sacrum_is_pelvis: bool = False) -> list[np.ndarray]:
    """Label maps for ``seeds`` (numpy only), in ``workers`` processes when > 1; ``regions`` fixes the field of
    view per map (None: the generator's random choice), ``generators`` picks labelmap or realshape per map;
    with ``cache`` each map is saved there once and read back on later runs (real shapes take seconds each)."""
    jobs = [(s, size, r, g, str(cache) if cache else None, sacrum_is_pelvis)
            for s, r, g in zip(seeds, regions or [None] * len(seeds), generators or ["labelmap"] * len(seeds))]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            return list(pool.imap(_one_map, jobs))
    return [_one_map(j) for j in jobs]


def classic_cases(n: int, seed: int, size: int, input_size: int, normalisation: dict, workers: int,
                  sacrum_is_pelvis: bool = False):
    """``n`` small classic phantoms (pelvis, thigh-knee, leg in turn) on the model grid, as inference sees them."""
    regions = ("pelvis", "thigh-knee", "leg")
    jobs = [(seed + i, size, regions[i % 3], sacrum_is_pelvis) for i in range(n)]
    if workers > 1 and n > 1:
        with mp.get_context("spawn").Pool(min(workers, n)) as pool:
            raw = list(pool.imap(_one_classic, jobs))
    else:
        raw = [_one_classic(j) for j in jobs]
    xs, ys = [], []
    for i, (img, lab, rd, cd, ps) in enumerate(raw):
        case = Case(f"classic{i}", img, lab, (ps[1], ps[0], 8.0), tuple(rd), tuple(cd))
        x, y = prepare_case(case, input_size, normalisation)
        xs.append(x)
        ys.append(y)
    return xs, ys


@torch.inference_mode()
def eval_random(net, batches, device, n_classes: int) -> list[float]:
    """Per-class Dice over fixed, pre-rendered randomised validation batches."""
    net.eval()
    preds, ys = [], []
    for x, y in batches:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds.append(net(x.to(device).contiguous(memory_format=torch.channels_last)).argmax(1).cpu())
        ys.append(y.cpu())
    net.train()
    return dice_per_class(torch.cat(preds), torch.cat(ys), n_classes)


def split_file(path: Path, dest: Path, max_mb: float) -> list[str]:
    """Copy ``path`` into ``dest`` as parts of at most ``max_mb`` MB (outputs must stay under a size limit)."""
    data = path.read_bytes()
    step = int(max_mb * 1024 * 1024)
    names = []
    for k, i in enumerate(range(0, len(data), step)):
        name = f"{path.name}.part{k:02d}"
        (dest / name).write_bytes(data[i:i + step])
        names.append(name)
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m inference.synth.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for best/last checkpoints and history")
    p.add_argument("--export", type=Path, help="also copy one checkpoint (split in parts) + history here")
    p.add_argument("--export-which", choices=("best", "last"), default="best",
                   help="the checkpoint --export copies (one: a GPU call brings back 64 MiB, a checkpoint is 49 MB)")
    p.add_argument("--split-mb", type=float, default=15.0, help="largest part written to --export")
    p.add_argument("--maps", type=int, default=64, help="training label maps generated up front")
    p.add_argument("--val-maps", type=int, default=4, help="held-out label maps for randomised validation")
    p.add_argument("--map-size", type=int, default=256, help="in-plane size of the label maps")
    p.add_argument("--workers", type=int, default=0, help="processes for map generation (0: all cores)")
    p.add_argument("--seed", type=int, default=0, help="map i uses seed seed*100000+i; validation maps follow")
    p.add_argument("--pelvis-maps", type=float, default=0.0,
                   help="share of training maps showing only the pelvic region (a fine-tune aimed at the pelvis)")
    p.add_argument("--real-shapes", type=float, default=0.0,
                   help="share of training and validation maps drawn around real bone shapes (inference.synth."
                        "realshape: the paediatric shape model, fetched once into its cache; 1: all)")
    p.add_argument("--sacrum-is-pelvis", action="store_true",
                   help="label the sacrum of the drawn maps and classic phantoms as pelvis, as v0.2.0 and earlier "
                        "were trained (to replay their recipes); by default PELVIS is the two hip bones only")
    p.add_argument("--share-t1", type=float, default=RenderConfig.share_t1,
                   help="share of training images painted with T1-like rather than fully random intensities")
    p.add_argument("--share-water", type=float, default=RenderConfig.share_water,
                   help="share painted water-like (Dixon W: fat and yellow marrow dark); validation keeps the "
                        "defaults so that runs with different shares are scored alike")
    p.add_argument("--map-cache", type=Path, help="folder where label maps are saved once and read back later")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--val-every", type=int, default=250, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=4, help="randomised validation batches")
    p.add_argument("--val-classic", type=int, default=3, help="classic phantom validation cases (0: none)")
    p.add_argument("--classic-size", type=int, default=192, help="matrix of the classic validation phantoms")
    p.add_argument("--classic-train", type=int, default=0,
                   help="classic phantoms (inference.phantom) generated for training beside the randomised maps")
    p.add_argument("--classic-mix", type=float, default=0.0,
                   help="share of each batch taken from --classic-train slices, so fine-tuning does not forget them")
    p.add_argument("--classic-flip", type=float, default=0.0,
                   help="share of the mixed-in classic slices mirrored left-right (0: as v0.2.0 was trained)")
    p.add_argument("--init-from", type=Path, help="start from this checkpoint (e.g. the bundled demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--render-device", default="", help="where batches are rendered (default: --device); "
                   "cpu is a fallback for GPU kernels that misbehave")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast of the forward pass (weights and optimiser stay float32); auto: bf16 on CUDA and "
                        "on CPUs with native bf16 (avx512_bf16/AMX: ~1.7x the steps of fp32 on the project's "
                        "2-core AMD EPYC), else fp32")
    p.add_argument("--full-precision", action="store_true", help="store float32 weights (default float16)")
    p.add_argument("--version", default="0.2.0")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--keep-teacher", type=float, default=0.0,
                   help="weight of a loss that keeps the output close to the --init-from checkpoint's on every "
                        "slice whose target has none of --teacher-free (0: off)")
    p.add_argument("--mirror-teacher", action="store_true",
                   help="hold the network to the mean of the starting checkpoint's output on each slice and on its "
                        "mirror image (so its left/right bias is not kept; one more teacher pass a step)")
    p.add_argument("--teacher-free", default="PELVIS",
                   help="comma-separated classes the fine-tune may relearn: slices showing any are not held to "
                        "the teacher")
    a = p.parse_args(argv)
    if a.keep_teacher and a.init_from is None:
        p.error("--keep-teacher needs --init-from (the checkpoint whose output is kept)")
    if a.mirror_teacher and not a.keep_teacher:
        p.error("--mirror-teacher changes what --keep-teacher holds: give --keep-teacher a weight, or leave it out")
    names = [c for c in a.teacher_free.split(",") if c]
    unknown = set(names) - set(CLASS_NAMES)
    if unknown:
        p.error(f"--teacher-free: unknown class {sorted(unknown)}; choose from {','.join(CLASS_NAMES)}")
    a.free_classes = tuple(CLASS_NAMES.index(c) + 1 for c in names)  # class values (background is 0)
    if not (a.share_t1 >= 0 and a.share_water >= 0 and a.share_t1 + a.share_water <= 1):
        p.error(f"--share-t1 {a.share_t1} and --share-water {a.share_water}: each at least 0, together at most 1")
    return a


def mix_classic(x: torch.Tensor, y: torch.Tensor, ctx: torch.Tensor, cty: torch.Tensor, n: int,
                gen: torch.Generator, flip: float = 0.0) -> None:
    """Put ``n`` random classic slices (as inference sees them) at the start of the batch, in place; a share
    ``flip`` of them mirrored left-right with their labels. The network labels bones without sides, so a
    mirrored leg is as valid as the original. v0.2.0 saw the classic phantoms only one way round, the likely
    reason its mirrored test-time pass disagrees with some good classic results (README, quality gate).
    No random draw is made for ``flip == 0``, so older recipes replay exactly."""
    j = torch.randint(0, ctx.shape[0], (n,), generator=gen).to(x.device)
    xs, ys = ctx[j].float(), cty[j].long()
    if flip > 0:
        m = (torch.rand(n, generator=gen) < flip).to(x.device)
        xs = torch.where(m[:, None, None, None], xs.flip(-1), xs)
        ys = torch.where(m[:, None, None], ys.flip(-1), ys)
    x[:n] = xs.expand(-1, x.shape[1], -1, -1)
    y[:n] = ys


def _generators(n: int, share: float) -> list[str]:
    """``n`` map generators, real shapes spread evenly at ``share`` (so pelvis-only maps get some too)."""
    k = round(share * n)
    picks = set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if k else set()
    return ["realshape" if i in picks else "labelmap" for i in range(n)]


def teacher_log_probs(teacher: torch.nn.Module, x: torch.Tensor, mirror: bool) -> torch.Tensor:
    """The starting checkpoint's log-probabilities for ``x``; with ``mirror`` the mean of its probabilities on
    ``x`` and, mirrored back, on ``x`` mirrored left-right.

    Why: v0.2.0 is not left/right symmetric (on the real-shape stand-in its pelvis scores 0.40 on the
    patient's right and 0.22 on the left, and mirroring the image swaps them; its fibula likewise). Holding a
    fine-tune to that output teaches the bias on, and ft10's plain pass still under-found the left fibula
    that its mirrored pass found (docs/model-data.md). A leg has no side the network labels, so the mean of
    both views is what the teacher knows without the bias."""
    p = teacher(x).float().softmax(1)
    if mirror:
        p = 0.5 * (p + teacher(x.flip(-1)).float().softmax(1).flip(-1))
    return p.clamp_min(1e-8).log()


def keep_teacher_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                      free: tuple[int, ...]) -> torch.Tensor:
    """KL(teacher || student) per pixel, averaged over the slices whose target has none of the ``free`` classes.

    Why: each CPU fine-tune aimed at the pelvis gained it and lost tibia on the foreign stand-in (README, ft3),
    although the knee data did not change. Holding the network to its starting point's output on slices that
    show no pelvis (learning without forgetting, Li & Hoiem 2017) leaves it free to relearn only what the
    fine-tune is for. Slices that show a free class are left to the ground truth alone: there the starting
    point is what is wrong (acetabulum called femur). Zero, with a gradient, when every slice is free.
    """
    held = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    for k in free:
        held &= ~(target == k).flatten(1).any(1)
    if not held.any():
        return student.sum() * 0.0
    ls = torch.log_softmax(student[held].float(), 1)
    lt = torch.log_softmax(teacher[held].float(), 1)
    return (lt.exp() * (lt - ls)).sum(1).mean()


def _card(a: argparse.Namespace, seeds: list[int], val_seeds: list[int]) -> ModelCard:
    return ModelCard(
        input_size=a.input_size, version=a.version,
        trained_on=(f"{len(seeds)} domain-randomised synthetic lower-limb label maps (inference.synth, seeds "
                    f"{seeds[0]}..{seeds[-1]}, {a.map_size}² in-plane, 3 mm slices): random anatomy and per-label "
                    "random contrast, bias, gamma, resolution, noise, ghosting, deformation, flips; "
                    "no real patient data"),
        intended_use="Demonstration and testing; never seen a real MRI. Not for clinical use.",
        pelvis_includes_sacrum=a.sacrum_is_pelvis,
        training={
            "command": " ".join(sys.argv), "date": _dt.date.today().isoformat(),
            "generator": ("inference.synth (labelmap + render), SynthSeg-style domain randomisation"
                          + (f"; {a.real_shapes:.2f} of the maps around real bone shapes (realshape: paediatric "
                             "shape model of Carman et al. 2022)" if a.real_shapes else "")),
            "train_map_seeds": [seeds[0], seeds[-1]], "val_map_seeds": val_seeds[:1] + val_seeds[-1:],
            "loss": f"dice + categorical focal (gamma {a.focal_gamma})",
            "optimizer": f"Adam lr={a.lr}, warm-up {a.warmup} steps, cosine over {a.minutes} min",
            "batch_size": a.batch_size, "seed": a.seed, "pelvis_maps": a.pelvis_maps,
            "contrasts": (f"{a.share_t1:.2f} T1-like, {a.share_water:.2f} water-like, the rest random per "
                          "generation label"),
            "pelvis_label": ("hip bones and sacrum (old definition)" if a.sacrum_is_pelvis
                             else "the two hip bones; sacrum, spine, patellae and feet background"),
            "classic_mix": (f"{a.classic_mix:.2f} of each batch from {a.classic_train} classic phantoms"
                            + (f", {a.classic_flip:.2f} of them mirrored" if a.classic_flip else "")
                            if a.classic_train else "none"),
            **({"keep_teacher": f"{a.keep_teacher} x KL to the starting checkpoint"
                                + (" (mean of it and its mirrored pass)" if a.mirror_teacher else "")
                                + f" on slices without {a.teacher_free.replace(',', '/')}"} if a.keep_teacher else {}),
        },
    )


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    workers = a.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    seeds = [a.seed * 100000 + i for i in range(a.maps)]
    val_seeds = [a.seed * 100000 + a.maps + i for i in range(a.val_maps)]
    n_pelvis = int(round(a.pelvis_maps * a.maps))
    gens = _generators(a.maps, a.real_shapes) + _generators(a.val_maps, a.real_shapes)
    if a.real_shapes > 0:
        from . import realshape

        realshape.models()  # fetch the shape model once, before the workers start
    maps = make_maps(seeds + val_seeds, a.map_size, workers,
                     ["pelvis"] * n_pelvis + [None] * (a.maps - n_pelvis + len(val_seeds)), gens, a.map_cache,
                     a.sacrum_is_pelvis)
    card = _card(a, seeds, val_seeds)
    cx, cy = classic_cases(a.val_classic, 7000 + a.seed, a.classic_size, a.input_size, card.normalisation, workers,
                           a.sacrum_is_pelvis)
    tx, ty = (classic_cases(a.classic_train, 9000 + a.seed, a.classic_size, a.input_size, card.normalisation, workers,
                            a.sacrum_is_pelvis)
              if a.classic_train and a.classic_mix > 0 else ([], []))
    log.info("%d label maps (%d slices), %d classic training and %d classic validation phantoms in %.0f s", len(maps),
             sum(m.shape[0] for m in maps), len(tx), len(cx), time.perf_counter() - t0)

    device = pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rdev = torch.device(a.render_device) if a.render_device else device
    ctx = torch.cat(tx).to(device) if tx else None  # (n, 1, S, S) classic slices as inference sees them
    cty = torch.cat(ty).to(device) if ty else None
    n_classic = int(round(a.classic_mix * a.batch_size)) if ctx is not None else 0
    bank = LabelBank.from_maps(maps[:a.maps], rdev)
    val_bank = LabelBank.from_maps(maps[a.maps:], rdev) if a.val_maps else None
    del maps
    vcfg = RenderConfig(size=a.input_size)
    rcfg = RenderConfig(size=a.input_size, share_t1=a.share_t1, share_water=a.share_water)
    vgen = torch.Generator().manual_seed(12345)
    val_batches = [render_batch(val_bank, a.batch_size, vgen, vcfg) for _ in range(a.val_batches)] if val_bank else []

    net = build_network(card)
    if a.init_from is not None:
        state, init_card = load_checkpoint(a.init_from)
        if ((init_card.architecture, init_card.encoder, init_card.num_classes)
                != (card.architecture, card.encoder, card.num_classes)):
            raise SystemExit(f"--init-from {a.init_from}: a {init_card.architecture}/{init_card.encoder} "
                             "cannot start this model")
        net.load_state_dict({k: v.float() for k, v in state.items()})
        card.training["init_from"] = f"{a.init_from.name} (v{init_card.version})"
    net = net.to(device).to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(net).eval().requires_grad_(False) if a.keep_teacher else None
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    dgen = torch.Generator(device=rdev).manual_seed(a.seed) if rdev.type == "cuda" else None
    amp = a.precision == "bf16" or (a.precision == "auto" and (device.type == "cuda" or native_bf16_cpu()))
    card.training["autocast"] = "bf16" if amp else "fp32"
    a.out.mkdir(parents=True, exist_ok=True)
    best_path, history, best_score = a.out / "best.safetensors", [], -1.0
    budget = a.minutes * 60.0
    t_train = time.perf_counter()
    step, run_loss, n_loss = 0, 0.0, 0

    def validate() -> None:
        nonlocal best_score
        rd = eval_random(net, val_batches, device, card.num_classes) if val_batches else []
        cl_loss, cd = (evaluate_slices(net, cx, cy, device, card.num_classes, a.focal_gamma) if cx
                       else (float("nan"), []))
        parts = [float(np.nanmean(d)) for d in (rd, cd) if len(d) and not np.all(np.isnan(d))]
        score = float(np.mean(parts)) if parts else 0.0
        rec = {"step": step, "minutes": round((time.perf_counter() - t_train) / 60, 2),
               "train_loss": run_loss / max(n_loss, 1), "lr": opt.param_groups[0]["lr"], "score": score,
               "val_random_dice": dict(zip(CLASS_NAMES, rd)), "val_classic_dice": dict(zip(CLASS_NAMES, cd)),
               "val_classic_loss": cl_loss}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if score > best_score:
            best_score = score
            card.metrics = {"step": step, "score": score, "val_random_dice": rec["val_random_dice"],
                            "val_classic_dice": rec["val_classic_dice"]}
            card.training["steps"] = step
            save_checkpoint(best_path, net.state_dict(), card, half=not a.full_precision)
        (a.out / "history.json").write_text(json.dumps(history, indent=1))

    if a.init_from is not None:
        validate()  # the starting point's scores, for the record (and the floor the run must beat)
    net.train()
    while True:
        elapsed = time.perf_counter() - t_train
        if elapsed >= budget or (a.max_steps and step >= a.max_steps):
            break
        lr = a.lr * min(1.0, (step + 1) / max(a.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        for g in opt.param_groups:
            g["lr"] = max(lr, a.lr * 0.02)
        x, y = render_batch(bank, a.batch_size, gen, rcfg, dgen=dgen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if n_classic and ctx is not None and cty is not None:  # n_classic is 0 without classic slices
            mix_classic(x, y, ctx, cty, n_classic, gen, a.classic_flip)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = dice_focal_loss(logits, y, a.focal_gamma)
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                t_logp = teacher_log_probs(teacher, x.contiguous(memory_format=torch.channels_last), a.mirror_teacher)
            loss = loss + a.keep_teacher * keep_teacher_loss(logits, t_logp, y, a.free_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_loss += loss.item() if step % 10 == 0 or a.max_steps else 0.0
        n_loss += 1 if step % 10 == 0 or a.max_steps else 0
        if step % a.val_every == 0:
            validate()
            run_loss, n_loss = 0.0, 0
    if not history or history[-1]["step"] != step:
        validate()
    card.training["steps"] = step
    last_path = a.out / "last.safetensors"
    save_checkpoint(last_path, net.state_dict(), card, half=not a.full_precision)
    log.info("%d steps in %.1f min, best score %.3f", step, (time.perf_counter() - t_train) / 60, best_score)
    if a.export:
        # one of them ("last" where the validation that picks "best", randomised maps and classic phantoms, may
        # favour the starting checkpoint's own domain over the shapes the run is for); both sha256s recorded
        a.export.mkdir(parents=True, exist_ok=True)
        chosen = best_path if a.export_which == "best" else last_path
        parts = split_file(chosen, a.export, a.split_mb)
        (a.export / "history.json").write_text(json.dumps(
            {"exported": a.export_which, "best": card_metrics(best_path), "steps": step, "parts": parts,
             "sha256": hashlib.sha256(chosen.read_bytes()).hexdigest(),
             "join": f"cat {chosen.name}.part* > {chosen.name}",
             "sha256_best": hashlib.sha256(best_path.read_bytes()).hexdigest(),
             "sha256_last": hashlib.sha256(last_path.read_bytes()).hexdigest(), "history": history}, indent=1))
    return best_path


def card_metrics(path: Path) -> dict:
    from ..model_card import read_card

    return read_card(path).metrics


if __name__ == "__main__":
    main()
