"""Batch augmentation on tensors: what varies between scanners and patients, never a left-right flip.

Left and right matter in the output (a femur on the wrong side is a wrong answer), so the spatial
augmentations are scale, rotation, translation and elastic deformation only. Intensity augmentation covers
contrast/gamma, a smooth bias field (coil shading) and noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def spatial(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, scale=(0.8, 1.25), rot_deg=12.0,
            shift=0.08, elastic=0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random affine + elastic warp for images (bilinear) and labels (nearest). x: (b,1,S,S), y: (b,S,S)."""
    b, _, s, _ = x.shape
    dev = x.device

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen).to(dev)

    sc = torch.exp(u(math.log(scale[0]), math.log(scale[1]), b))
    th = u(-rot_deg, rot_deg, b) * math.pi / 180
    tx, ty = u(-shift, shift, b), u(-shift, shift, b)
    cos, sin = torch.cos(th) / sc, torch.sin(th) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    if elastic > 0:
        coarse = (torch.rand(b, 2, 6, 6, generator=gen).to(dev) * 2 - 1) * elastic
        grid = grid + F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    xo = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    yo = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return xo, yo[:, 0].long()


def intensity(x: torch.Tensor, gen: torch.Generator, noise=0.05, bias=0.35, gamma=(0.7, 1.5)) -> torch.Tensor:
    """Gamma, contrast, smooth multiplicative bias field and Gaussian noise on [0, 1] images."""
    b, _, s, _ = x.shape
    dev = x.device

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen).to(dev)

    g = torch.exp(u(math.log(gamma[0]), math.log(gamma[1]), b, 1, 1, 1))
    x = x.clamp(0, 1) ** g
    coarse = torch.randn(b, 1, 4, 4, generator=gen).to(dev) * bias / 2
    x = x * torch.exp(F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False))
    x = x * u(0.85, 1.15, b, 1, 1, 1) + u(-0.05, 0.05, b, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen).to(dev) * u(0, noise, b, 1, 1, 1)
    return x.clamp(0, 1)
