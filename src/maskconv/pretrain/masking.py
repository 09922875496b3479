"""Masks, one convention: ``mask`` is a bool tensor (B, h, w), **True = masked (hidden)**, and every sample keeps
exactly the same number of visible patches (shuffle-and-keep, as MAE/FCMAE), so gathered tensors stay regular.
Official float masks (1 = removed) are converted only at the edges."""
from __future__ import annotations

import torch

from ..config import MASK_RATIO_RANGE, mask_ratio_ok


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: ``int(L * (1 - ratio))`` as the official code."""
    return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float) -> None:
    """ValueError unless ``mask_ratio`` is in the one range ``config.mask_ratio_ok`` defines."""
    if not mask_ratio_ok(mask_ratio):
        raise ValueError(f"mask_ratio must be {MASK_RATIO_RANGE}, got {mask_ratio}")


def random_mask(batch: int, h: int, w: int, mask_ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random mask (B, h, w), True = masked; each sample keeps ``int(h*w*(1-ratio))`` patches."""
    check_mask_ratio(mask_ratio)
    L = h * w
    keep = num_visible(L, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch on a {h}x{w} grid; use a lower ratio "
                         "or larger images")
    noise = torch.rand(batch, L, device=device, generator=generator)
    ids_keep = noise.argsort(dim=1)[:, :keep]  # smallest noise kept, as MAE
    mask = torch.ones(batch, L, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return mask.view(batch, h, w)


def check_mask(mask: torch.Tensor, batch: int, h: int, w: int) -> int:
    """Validate a user mask against the expected (B, h, w) grid; returns the visible count per sample."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got {mask.dtype}; "
                         "for an official float mask (1 = removed) pass mask.bool()")
    if tuple(mask.shape) != (batch, h, w):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, h, w) = {(batch, h, w)} "
                         "(one entry per patch of the encoder's total stride)")
    vis = (~mask).flatten(1).sum(1)
    if (vis != vis[0]).any():
        raise ValueError(f"every sample must keep the same number of visible patches; got {vis.tolist()}")
    if int(vis[0]) == 0:
        raise ValueError("mask hides every patch: at least one patch per sample must stay visible")
    return int(vis[0])


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, h, w) -> (B, h*scale, w*scale), each patch entry repeated over its scale x scale cells."""
    if scale == 1:
        return mask
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def visible_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (B*L_vis,) of visible cells into a (B*h*w) row-major layout, sample-major, position order."""
    b, h, w = mask.shape
    vis = (~mask).reshape(b, h * w)
    idx = vis.nonzero()  # (B*L_vis, 2) rows sorted by (sample, position)
    return idx[:, 0] * (h * w) + idx[:, 1]


def indexed_masks(indices: torch.Tensor, epoch: int, seed: int, h: int, w: int, mask_ratio: float,
                  device=None) -> torch.Tensor:
    """(B, h, w) masks, sample i's drawn from its own generator seeded by (seed, epoch, global index): the same
    sample gets the same mask whichever process, batch position or world size it lands in, so N processes
    train on exactly the masks one process would (and a resumed run on the masks of an uninterrupted one)."""
    rows = []
    for i in indices.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 100_003 + int(i)) % (2**63) ^ 0x5DEECE66D)
        rows.append(random_mask(1, h, w, mask_ratio, generator=g))
    return torch.cat(rows).to(device)
