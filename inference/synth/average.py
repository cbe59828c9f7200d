"""Blend two checkpoints of the same network weight by weight (WiSE-FT, Wortsman et al. 2022).

Why: a short fine-tune on new data (here: the solid ischium) learns the new thing but forgets some of the
old (a CPU fine-tune lost the knee while it found the pelvis). Interpolating the fine-tuned weights with the
ones it started from often keeps most of both, because the two lie in one basin of the loss; the blend
costs nothing at run time (one network, as before). Which ``--alpha`` is best is measured on held-out data,
never assumed: ``dicom-node evaluate`` on the three held-out families (README, demo model).

    python -m inference.synth.average inference/weights/demo-lower-limb.safetensors runs/ft3/best.safetensors \\
        --alpha 0.5 --out runs/wise50.safetensors --version 0.3.0

Batch-norm running statistics are blended like the weights; integer buffers (``num_batches_tracked``) are
taken from the fine-tuned checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.model_card import ModelCard, load_checkpoint, save_checkpoint


def blend(start: Path, tuned: Path, alpha: float) -> tuple[dict, ModelCard]:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point tensor; the card is ``tuned``'s,
    with the blend written into its training record."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha {alpha}: must lie in [0, 1] (0 = the start, 1 = the fine-tune)")
    a, card_a = load_checkpoint(start)
    b, card_b = load_checkpoint(tuned)
    if (card_a.architecture, card_a.encoder, card_a.num_classes) != (card_b.architecture, card_b.encoder,
                                                                    card_b.num_classes) or a.keys() != b.keys():
        raise ValueError(f"{start} and {tuned} are not the same network; they cannot be blended")
    out = {}
    for k, vb in b.items():
        va = a[k]
        if va.shape != vb.shape:
            raise ValueError(f"{k}: shape {tuple(va.shape)} in {start}, {tuple(vb.shape)} in {tuned}")
        out[k] = ((1.0 - alpha) * va.float() + alpha * vb.float()) if vb.is_floating_point() else vb.clone()
    card_b.training = dict(card_b.training, blend={
        "method": "WiSE-FT weight interpolation", "alpha": alpha,
        "start": f"{start.name} (v{card_a.version}, sha256 {card_a.checkpoint_sha256[:16]})",
        "fine_tuned": f"{tuned.name} (v{card_b.version}, sha256 {card_b.checkpoint_sha256[:16]})"})
    card_b.metrics = {}  # the fine-tune's validation scores are not the blend's
    return out, card_b


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("start", type=Path, help="the checkpoint the fine-tune started from")
    p.add_argument("tuned", type=Path, help="the fine-tuned checkpoint")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tune (0: start, 1: fine-tune)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", default="", help="version written into the card (default: the fine-tune's)")
    p.add_argument("--full-precision", action="store_true", help="store float32 weights (default float16)")
    a = p.parse_args(argv)
    try:
        state, card = blend(a.start, a.tuned, a.alpha)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if a.version:
        card.version = a.version
    save_checkpoint(a.out, state, card, half=not a.full_precision)
    print(json.dumps({"out": str(a.out), "alpha": a.alpha, "version": card.version}))
    return a.out


if __name__ == "__main__":
    main()
