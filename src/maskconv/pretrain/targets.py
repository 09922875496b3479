"""Pixel targets: patchify / unpatchify with the official (p, q, c) ordering, and per-patch normalisation."""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), L = (H/p)*(W/p) row-major; each patch flattened as (p, q, c)."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, h*p, w*p); ``h, w`` is the patch grid. Inverse of ``patchify``."""
    b = x.shape[0]
    if x.shape[1] != h * w or x.shape[2] != p * p * c:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into a {h}x{w} grid of {p}x{p}x{c} patches")
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


def patch_stats(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased var + eps, as the official norm_pix_loss) of (B, L, D) targets."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std
