"""Whole randomised or foreign cases written as datasets, for ``dicom-node phantoms --family``.

Training never reads these (it renders on the fly); they exist so that ``dicom-node evaluate`` can score
any model on the randomised family (one random contrast per volume, as a scanner would give) and on the
foreign family (``foreign.py``) through the node's real DICOM path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..phantom import Geometry, Phantom
from ..phantom_io import write_training_case
from . import labelmap
from . import labels as L
from .render import RenderConfig, _contrasts

FAMILIES = ("classic", "randomized", "foreign")


def randomized_case(seed: int, size: int = 256) -> Phantom:
    """A random label map rendered with one random contrast, bias field and Rician noise for the volume."""
    vol, meta = labelmap.generate(seed, size=size)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _contrasts(1, gen, RenderConfig(), "cpu")
    lab = torch.from_numpy(vol).long()
    img = mean[0][lab] + std[0][lab] * torch.randn(lab.shape, generator=gen)
    img = F.avg_pool2d(img[:, None], 3, 1, 1)[:, 0].clamp(min=0)  # a little in-plane blur
    coarse = torch.randn(1, 1, 4, 4, generator=gen) * 0.3
    img = img * torch.exp(F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False))[0]
    sd = float(img.quantile(0.99)) * 0.03
    n1, n2 = torch.randn(2, *img.shape, generator=gen) * sd
    magnitude = torch.sqrt((img + n1) ** 2 + n2**2).numpy()
    ps, dz = meta["pixel_mm"], meta["slice_mm"]
    n = vol.shape[0]
    geom = Geometry(size, size, n, (ps, ps), (-(size - 1) / 2 * ps, -(size - 1) / 2 * ps, 0.0),
                    slice_step=(0.0, 0.0, -dz), slice_thickness=dz)
    scaled = np.clip(magnitude / max(float(np.percentile(magnitude, 99.9)), 1e-3) * 3000, 0, 4095).astype(np.uint16)
    return Phantom(anatomy=None, geometry=geom, image=scaled, labels=L.CLASS_OF[vol])  # type: ignore[arg-type]


def write_family(family: str, root: Path, n_cases: int, seed: int = 0) -> list[str]:
    """Write ``n_cases`` of ``family`` ("randomized" or "foreign") in the training/evaluation layout."""
    if family == "foreign":
        from .foreign import write_dataset

        return write_dataset(root, n_cases, seed=seed)
    if family != "randomized":
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_cases):
        name = f"ra{seed + i:05d}"
        write_training_case(randomized_case(seed + i), root, name, seed=seed + i)
        names.append(name)
    return names
