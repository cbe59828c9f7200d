"""The model card every checkpoint carries, and the checkpoint file format (safetensors + card).

A hospital must be able to tell what a model is before it writes results into their PACS: architecture,
input size, normalisation, the label table with SNOMED codes, version and what it was trained on. The card
is stored inside the safetensors header (``__metadata__["model_card"]``), so it cannot be separated from the
weights, and the node refuses a checkpoint without one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .labels import DEFAULT_LABELS, Label

CARD_KEY = "model_card"
REQUIRED = ("architecture", "encoder", "input_size", "normalisation", "labels", "version", "trained_on")


class ModelCardError(ValueError):
    """The checkpoint has no usable model card."""


@dataclass
class ModelCard:
    architecture: str = "Unet"
    encoder: str = "resnet34"
    in_channels: int = 3
    input_size: int = 256
    normalisation: dict = field(
        default_factory=lambda: {"method": "minmax", "lower_percentile": 0.0, "upper_percentile": 99.5})
    labels: list[Label] = field(default_factory=lambda: list(DEFAULT_LABELS))
    version: str = "0.0.0"
    name: str = "lower-limb-bones"
    trained_on: str = ""
    intended_use: str = ""
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    #: whether the model was taught the sacrum as PELVIS. Every model before 2026-12-07 was (their cards do not
    #: say, hence the default); since then PELVIS means the two hip bones (docs/model.md, "What pelvis means")
    #: and the trainer records which definition it used, so the quality gate knows whether a pelvis on the
    #: midline above the hips is the model's error or its definition.
    pelvis_includes_sacrum: bool = True
    #: sha256 of the checkpoint file the card was read from (set by :func:`load_checkpoint`, never stored)
    checkpoint_sha256: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return 1 + len(self.labels)

    @property
    def device_uid(self) -> str:
        """A DICOM UID for this trained model (IHE AIR's Device UID): the same for the same checkpoint on
        every node, a new one for every retraining (its weights differ), without a registry of UIDs.

        From the checkpoint's sha256 when the card came with one, else from the card itself: a name-based
        (SHA-1, version 5) UUID of it, written as a UUID-derived UID (2.25.<integer>, ISO/IEC 9834-8)."""
        basis = self.checkpoint_sha256 or hashlib.sha256(self.to_json().encode()).hexdigest()
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'urn:dicom-seg-node:model:{basis}').int}"

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("checkpoint_sha256")
        d["labels"] = [lab.to_dict() for lab in self.labels]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        missing = [k for k in REQUIRED if not d.get(k)]
        if missing:
            raise ModelCardError(f"model card lacks {', '.join(missing)}")
        d["labels"] = [Label.from_dict(x) for x in d["labels"]]
        values = sorted(lab.value for lab in d["labels"])
        if values != list(range(1, len(values) + 1)):
            raise ModelCardError(f"model card label values must be 1..N, got {values}")
        known = {f for f in cls.__dataclass_fields__} - {"checkpoint_sha256"}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_checkpoint(path: Path, state_dict: dict, card: ModelCard, half: bool = False) -> None:
    """Write weights and card to one safetensors file (optionally in half precision to halve its size)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json(), "format": "pt"})
    tmp.replace(path)
    del torch


def read_card(path: Path) -> ModelCard:
    """Read only the card (no weights): cheap, used by ``status`` and at start-up checks."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelCardError(f"{path}: not a safetensors checkpoint ({exc})") from exc
    if CARD_KEY not in meta:
        raise ModelCardError(f"{path}: checkpoint has no model card; refusing to load it")
    return ModelCard.from_json(meta[CARD_KEY])


def load_checkpoint(path: Path) -> tuple[dict, ModelCard]:
    from safetensors.torch import load_file

    card = read_card(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    card.checkpoint_sha256 = digest.hexdigest()
    return load_file(str(path)), card
