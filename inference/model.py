"""Building the segmentation network and loading it from a checkpoint with its model card."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .bundled import BUNDLED_MODEL  # noqa: F401 (benches and tests name the bundled model here)
from .model_card import ModelCard, load_checkpoint

log = logging.getLogger(__name__)


def build_network(card: ModelCard, encoder_weights_file: Path | None = None) -> torch.nn.Module:
    """An smp network as the card describes; never downloads weights.

    ``encoder_weights_file`` optionally holds ImageNet (or other) encoder weights saved by the site
    (a torch or safetensors state dict of the encoder); without it the encoder starts random.
    """
    import segmentation_models_pytorch as smp

    arch = getattr(smp, card.architecture, None)
    if arch is None:
        raise ValueError(f"unknown architecture {card.architecture!r} in model card")
    net = arch(encoder_name=card.encoder, encoder_weights=None, in_channels=card.in_channels, classes=card.num_classes)
    if encoder_weights_file is not None:
        if str(encoder_weights_file).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(encoder_weights_file))
        else:
            sd = torch.load(str(encoder_weights_file), map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # classifier head of ImageNet models
        missing, unexpected = net.encoder.load_state_dict(sd, strict=False)
        log.info("encoder weights from %s (%d missing, %d unexpected keys)", encoder_weights_file, len(missing),
                 len(unexpected))
    return net


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


#: Precisions the predictor runs in (autocast for the network; pre- and post-processing stay float32).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16_cpu() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions
    about twice as fast as float32; elsewhere bf16 is emulated and slower, so ``auto`` keeps float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # private helpers: absent in some torch builds
        return False


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, else float32. fp16 is for CUDA only."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16_cpu() else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on CPU use bf16 or fp32)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, ModelCard]:
    """Load a checkpoint (refusing one without a model card) in eval mode, float32 on CPU."""
    state, card = load_checkpoint(path)
    net = build_network(card)
    state = {k: v.float() for k, v in state.items()}
    net.load_state_dict(state)
    net.eval().to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return net, card
