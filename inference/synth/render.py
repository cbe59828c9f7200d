"""Batched, randomised images from label-map slices, on whatever device the tensors live on (GPU or CPU).

One call turns a batch of label slices into training pairs the way SynthSeg does, so that no contrast,
resolution or artefact is special: random spatial deformation (scale, rotation, shear, elastic, left–right
flip: the network labels bones without side), per generation label a random mean U(0,255) and spread
U(0,50) (a share of ordinary T1-like and water-like contrasts mixed in), partial-volume through the slice
thickness (neighbouring label slices blended), in-plane resolution loss (blur + down/up-sampling), a smooth
multiplicative bias field, gamma, Rician noise, optional motion ghosts, and finally exactly the
normalisation the predictor applies (min to 99.5th percentile → [0, 1], zero padding of a non-square
field of view, grey copied to 3 channels). The target is the centre slice mapped to the 5 classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import labels as L


@dataclass
class LabelBank:
    """All label slices of all maps in one tensor, so a batch is one gather (on the training device)."""

    slices: torch.Tensor  # (N, H, W) uint8 generation labels
    up: torch.Tensor  # (N,) index of the slice above (itself at a map's top)
    down: torch.Tensor  # (N,) index of the slice below
    bone: torch.Tensor  # (N,) bool: slice shows a segmented bone
    slice_mm: float = 3.0
    n_gen: int = L.N_GEN_BASE  # generation labels drawn per image: the old 23 unless a map has physes

    @classmethod
    def from_maps(cls, maps: list[np.ndarray], device: torch.device | str = "cpu", slice_mm: float = 3.0) -> LabelBank:
        sizes = {m.shape[1:] for m in maps}
        if len(sizes) != 1:
            raise ValueError(f"label maps must share their in-plane size, got {sizes}")
        idx, up, down, bone = [], [], [], []
        start = 0
        for m in maps:
            bone.append((L.CLASS_OF[m] > 0).reshape(m.shape[0], -1).any(1))
            n = m.shape[0]
            i = np.arange(start, start + n)
            up.append(np.maximum(i - 1, start))
            down.append(np.minimum(i + 1, start + n - 1))
            idx.append(i)
            start += n
        vol = torch.from_numpy(np.concatenate(maps)).to(device)
        n_gen = L.N_GEN if max(int(m.max()) for m in maps) >= L.N_GEN_BASE else L.N_GEN_BASE
        return cls(vol, torch.from_numpy(np.concatenate(up)).to(device),
                   torch.from_numpy(np.concatenate(down)).to(device),
                   torch.from_numpy(np.concatenate(bone)).to(device), slice_mm, n_gen)

    def bone_index(self) -> torch.Tensor:
        """Indices (CPU) of slices showing a bone, computed once: no device sync per batch."""
        if getattr(self, "_bone_idx", None) is None:
            self._bone_idx = torch.nonzero(self.bone).flatten().cpu()
        return self._bone_idx

    def __len__(self) -> int:
        return int(self.slices.shape[0])


@dataclass
class RenderConfig:
    """Ranges of the randomisation (defaults as SynthSeg+/nnU-Net where they say, see REFERENCE.md §5)."""

    size: int = 256
    bone_fraction: float = 0.8  # share of slices drawn from those showing a segmented bone
    zoom: tuple[float, float] = (0.75, 2.0)  # >1 zooms in (partial in-plane field of view, one leg)
    rotation_deg: float = 15.0
    stretch: float = 0.15  # per-axis scale U(1-s, 1+s)
    shear: float = 0.05
    shift: float = 0.2
    elastic: float = 0.03
    flip: float = 0.5
    share_t1: float = 0.2  # realistic-ish contrasts mixed in
    share_water: float = 0.1
    mean_range: tuple[float, float] = (0.0, 255.0)
    std_max: float = 50.0
    thickness_mm: tuple[float, float] = (1.0, 8.0)
    res_factor: tuple[float, float] = (1.0, 3.0)  # in-plane acquisition pixel / grid pixel
    bias_max: float = 0.5
    gamma_sd: float = 0.4
    noise_max: float = 0.08  # Rician noise sd as a fraction of the 99th percentile
    ghost_p: float = 0.15
    pad_p: float = 0.5  # rectangular FOV padded to a square, as the predictor does
    hi_jitter: float = 0.25  # volume-wide vs slice percentile: log-uniform factor on the upper bound


def _u(gen: torch.Generator, lo: float, hi: float, *shape: int, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(device)


def _contrasts(b: int, gen: torch.Generator, cfg: RenderConfig, device, n_gen: int = L.N_GEN_BASE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and generation label (the first ``n_gen``): mean and spread of the intensity."""
    lo, hi = cfg.mean_range
    mean = _u(gen, lo, hi, b, n_gen, device="cpu")
    std = _u(gen, 0, cfg.std_max, b, n_gen, device="cpu")
    kind = torch.rand(b, generator=gen)
    for i in range(b):
        if kind[i] < cfg.share_t1:
            table = _T1
        elif kind[i] < cfg.share_t1 + cfg.share_water:
            table = _WATER
        else:
            continue
        red_marrow = bool(torch.rand(1, generator=gen) < 0.3)  # children: red (cellular) marrow
        for lab_, (a, z) in table.items():
            if lab_ >= n_gen:
                continue
            if red_marrow and lab_ in L.MARROWS:
                a, z = _RED_MARROW_T1 if table is _T1 else _RED_MARROW_WATER
            mean[i, lab_] = a + (z - a) * torch.rand(1, generator=gen)
        std[i] = _u(gen, 1, 12, n_gen, device="cpu")
    return mean.to(device), std.to(device)


_T1 = {L.BACKGROUND: (0, 12), L.SKIN: (110, 180), L.FAT: (190, 250), **{m: (55, 115) for m in L.MUSCLES},
       L.SEPTUM: (150, 240), L.VESSEL: (10, 200), L.VISCERA: (70, 150), L.FLUID: (25, 80), L.OBJ_BRIGHT: (120, 255),
       L.OBJ_DARK: (0, 25), **{c: (0, 30) for c in L.CORTICES}, **{m: (160, 245) for m in L.MARROWS},
       **{p: (50, 120) for p in L.PHYSES}}
_WATER = {L.BACKGROUND: (0, 12), L.SKIN: (50, 110), L.FAT: (5, 50), **{m: (35, 85) for m in L.MUSCLES},
          L.SEPTUM: (5, 50), L.VESSEL: (60, 230), L.VISCERA: (70, 170), L.FLUID: (170, 250), L.OBJ_BRIGHT: (120, 255),
          L.OBJ_DARK: (0, 25), **{c: (0, 20) for c in L.CORTICES}, **{m: (10, 60) for m in L.MARROWS},
          **{p: (110, 220) for p in L.PHYSES}}
_RED_MARROW_T1 = (80, 140)
_RED_MARROW_WATER = (70, 150)


def _affine_grid(b: int, size: int, gen: torch.Generator, cfg: RenderConfig, device) -> torch.Tensor:
    """Sampling grid (b, S, S, 2): zoom, anisotropic stretch, shear, rotation, shift, flip and elastic warp."""
    z = torch.exp(_u(gen, math.log(cfg.zoom[0]), math.log(cfg.zoom[1]), b, device="cpu"))
    sx = _u(gen, 1 - cfg.stretch, 1 + cfg.stretch, b, device="cpu") / z
    sy = _u(gen, 1 - cfg.stretch, 1 + cfg.stretch, b, device="cpu") / z
    th = _u(gen, -cfg.rotation_deg, cfg.rotation_deg, b, device="cpu") * math.pi / 180
    sh = _u(gen, -cfg.shear, cfg.shear, b, device="cpu")
    flip = torch.where(torch.rand(b, generator=gen) < cfg.flip, -1.0, 1.0)
    c, s = torch.cos(th), torch.sin(th)
    a = torch.stack([torch.stack([c * sx * flip, -s * sy + sh, _u(gen, -cfg.shift, cfg.shift, b, device="cpu")], 1),
                     torch.stack([s * sx * flip, c * sy, _u(gen, -cfg.shift, cfg.shift, b, device="cpu")], 1)], 1)
    grid = F.affine_grid(a.to(device), [b, 1, size, size], align_corners=False)
    if cfg.elastic > 0:
        coarse = (torch.rand(b, 2, 5, 5, generator=gen) * 2 - 1).to(device) * cfg.elastic
        grid = grid + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return grid


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (b, 1, S, S) with a per-image sigma (pixels), as one grouped conv each way."""
    b = x.shape[0]
    r = int(math.ceil(3 * float(sigma.max()))) if b else 0
    if r < 1:
        return x
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    y = x.transpose(0, 1)  # (1, b, S, S): images as channels for a grouped conv
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=b)
    # back to (b, 1, S, S) as a contiguous tensor: the transposed view's strides are ones some CUDA
    # kernels (adaptive pooling, upsampling) mis-handle
    return y.transpose(0, 1).contiguous()


def _randn(shape: tuple[int, ...], gen: torch.Generator, dgen: torch.Generator | None, dev) -> torch.Tensor:
    """Large noise tensors come from a generator on the device (no host→GPU copy per batch) when given."""
    if dgen is not None:
        return torch.randn(shape, generator=dgen, device=dev)
    return torch.randn(shape, generator=gen).to(dev)


def render_batch(bank: LabelBank, batch: int, gen: torch.Generator, cfg: RenderConfig,
                 idx: torch.Tensor | None = None, dgen: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of randomised model inputs (b, 3, S, S) in [0, 1] and their class targets (b, S, S) int64.

    ``gen`` is a CPU generator: all random draws come from it (then move to the bank's device), so a seed
    gives the same batch on CPU and GPU up to floating-point differences. ``dgen``, a generator on the
    bank's device, draws the per-pixel noise instead (much faster on a GPU; then CPU and GPU differ).
    """
    dev = bank.slices.device
    S = cfg.size
    if idx is None:
        n = len(bank)
        bone_idx = bank.bone_index()
        pick_bone = torch.rand(batch, generator=gen) < cfg.bone_fraction
        any_i = torch.randint(0, n, (batch,), generator=gen)
        if len(bone_idx):
            bi = bone_idx[torch.randint(0, len(bone_idx), (batch,), generator=gen)]
            any_i = torch.where(pick_bone, bi, any_i)
        idx = any_i
    idx = idx.to(dev)
    b = idx.shape[0]
    lab3 = torch.stack([bank.slices[bank.up[idx]], bank.slices[idx], bank.slices[bank.down[idx]]], 1)  # (b,3,H,W)
    grid = _affine_grid(b, S, gen, cfg, dev)
    lab3 = F.grid_sample(lab3.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()

    # intensities per generation label, partial volume over the slice thickness
    mean, std = _contrasts(b, gen, cfg, dev, bank.n_gen)
    noise = _randn((b, 3, S, S), gen, dgen, dev)
    flat = lab3.flatten(1)
    img = (mean.gather(1, flat) + std.gather(1, flat) * noise.flatten(1)).view(b, 3, S, S)
    thick = _u(gen, cfg.thickness_mm[0], cfg.thickness_mm[1], b, device=dev)
    sig_z = (thick / 2.355 / bank.slice_mm).clamp(min=1e-3)
    w_side = torch.exp(-0.5 / sig_z**2)
    w = torch.stack([w_side, torch.ones_like(w_side), w_side], 1)
    img = (img * (w / w.sum(1, keepdim=True))[:, :, None, None]).sum(1, keepdim=True)  # (b,1,S,S)

    # in-plane resolution: matched blur, then down to the acquisition grid and back
    f = _u(gen, cfg.res_factor[0], cfg.res_factor[1], b, device=dev)
    img = _gauss_blur(img, (f - 1).clamp(min=0) * 0.45)
    fb = float(f.median())
    if fb > 1.2:
        low = max(8, int(round(S / fb)))
        # images as the channels of one sample: (b, 1, S, S) is ambiguous between NCHW and channels_last,
        # and CUDA's adaptive pooling faulted on it (illegal memory access on an H100); (1, b, S, S) is not
        one = img.reshape(1, b, S, S)
        one = F.interpolate(F.interpolate(one, size=(low, low), mode="area"), size=(S, S), mode="bilinear",
                            align_corners=False)
        img = one.reshape(b, 1, S, S)

    # bias field, gamma, Rician noise, ghosts
    img = img.clamp(min=0)
    g = int(torch.randint(3, 7, (1,), generator=gen))
    coarse = torch.randn(b, 1, g, g, generator=gen).to(dev) * _u(gen, 0, cfg.bias_max, b, 1, 1, 1, device=dev)
    img = img * torch.exp(F.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False))
    top = torch.quantile(img.flatten(1)[:, :: max(1, S * S // 16384)], 0.99, dim=1).clamp(min=1e-3)[:, None, None, None]
    img = (img / top).clamp(min=0)
    img = img ** torch.exp(torch.randn(b, 1, 1, 1, generator=gen).to(dev) * cfg.gamma_sd)
    sd = _u(gen, 0, cfg.noise_max, b, 1, 1, 1, device=dev)
    n1, n2 = _randn((2, b, 1, S, S), gen, dgen, dev)
    img = torch.sqrt((img + sd * n1) ** 2 + (sd * n2) ** 2)
    ghost = (torch.rand(b, generator=gen) < cfg.ghost_p).to(dev)
    if bool(ghost.any()):
        k = int(torch.randint(S // 8, S // 2, (1,), generator=gen))
        amp = _u(gen, 0.05, 0.3, b, 1, 1, 1, device=dev) * ghost[:, None, None, None]
        img = img + amp * (torch.roll(img, k, dims=2) + torch.roll(img, -k, dims=2)) / 2

    y = torch.from_numpy(L.CLASS_OF).to(dev)[lab3[:, 1]]
    # a rectangular field of view padded to a square: nothing outside, neither image nor label
    keep = torch.ones(b, 1, S, S, dtype=torch.bool, device=dev)
    rows = torch.arange(S, device=dev)[None, :, None]
    pad = (torch.rand(b, generator=gen) < cfg.pad_p).to(dev)
    half = (_u(gen, 0.25, 0.5, b, device=dev) * S)[:, None, None]
    keep[:, 0] &= ~pad[:, None, None] | ((rows - S / 2).abs() < half)
    return normalise(img, keep, gen, cfg), torch.where(keep[:, 0], y, 0).long()


def normalise(img: torch.Tensor, keep: torch.Tensor, gen: torch.Generator, cfg: RenderConfig) -> torch.Tensor:
    """As ``preprocessing.intensity_range`` + ``to_model_input``: (x - min) / (p99.5 - min), clamped, padding 0.

    The predictor takes the percentile over the whole volume, so the slice's own bound is jittered.
    """
    b = img.shape[0]
    dev = img.device
    flat = torch.where(keep, img, torch.nan).flatten(1)
    lo = torch.nan_to_num(flat, nan=float("inf")).amin(1)
    sub = flat[:, :: max(1, flat.shape[1] // 16384)]
    hi = torch.nanquantile(sub, 0.995, dim=1)
    hi = lo + (hi - lo) * torch.exp(_u(gen, -cfg.hi_jitter, cfg.hi_jitter, b, device=dev))
    hi = torch.where(hi > lo, hi, lo + 1.0)
    x = ((img - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]).clamp(0, 1)
    x = torch.where(keep, x, 0.0)
    return x.expand(-1, 3, -1, -1).contiguous()
