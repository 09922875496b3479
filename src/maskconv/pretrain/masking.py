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


def _keep(h: int, w: int, mask_ratio: float) -> int:
    """Visible patches per sample on an h x w grid; a clear error for a ratio that leaves none."""
    check_mask_ratio(mask_ratio)
    keep = num_visible(h * w, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch on a {h}x{w} grid; use a lower ratio "
                         "or larger images")
    return keep


def random_mask(batch: int, h: int, w: int, mask_ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random mask (B, h, w), True = masked; each sample keeps ``int(h*w*(1-ratio))`` patches."""
    L, keep = h * w, _keep(h, w, mask_ratio)
    noise = torch.rand(batch, L, device=device, generator=generator)
    ids_keep = noise.argsort(dim=1)[:, :keep]  # smallest noise kept, as MAE
    mask = torch.ones(batch, L, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return mask.view(batch, h, w)


def check_mask(mask: torch.Tensor, batch: int, h: int, w: int, keep: int | None = None, read: bool = True) -> int:
    """Validate a user mask against the expected (B, h, w) grid; returns the visible count per sample.

    Under ``torch.compile``, or with ``read=False`` (a mask the objectives or the engine drew), only the shape (and
    dtype) is checked, with no host sync: the count is ``keep`` (the objective's own count for its
    ``mask_ratio``), which the masks the objectives and the engine draw always have.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got {mask.dtype}; "
                         "for an official float mask (1 = removed) pass mask.bool()")
    if tuple(mask.shape) != (batch, h, w):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, h, w) = {(batch, h, w)} "
                         "(one entry per patch of the encoder's total stride)")
    if torch.compiler.is_compiling() or not read:
        if keep is None:
            raise ValueError("check_mask without reading the mask (torch.compile, read=False) needs keep= (the visible "
                             "count cannot be read without "
                             "a device->host sync)")
        return keep
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


def visible_positions(mask: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, L_vis) positions of the visible cells of each sample (row-major, ascending), ``keep`` per sample.

    A stable sort of the 0/1 mask puts the visible cells first in position order: the count is a Python int, so
    the shape is static and no ``nonzero`` (a device->host sync and a graph break) is needed."""
    b, h, w = mask.shape
    return mask.reshape(b, h * w).to(torch.uint8).argsort(dim=1, stable=True)[:, :keep]


def visible_index(mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Flat indices (B*L_vis,) of visible cells into a (B*h*w) row-major layout, sample-major, position order;
    ``keep`` visible cells per sample (``check_mask``'s count, times the upsampling factor squared)."""
    b, h, w = mask.shape
    pos = visible_positions(mask, keep)  # (B, keep)
    return (pos + torch.arange(b, device=mask.device).unsqueeze(1) * (h * w)).reshape(-1)


def _mix32(x):
    """A 32-bit integer hash, a bijection of [0, 2**32) (int64 tensor or Python int): xor-shift-multiply rounds
    with an odd constant below 2**31, so no product leaves the int64 range on any device or under inductor."""
    m = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    return (x >> 16) ^ x


def indexed_masks(indices: torch.Tensor, epoch: int, seed: int, h: int, w: int, mask_ratio: float,
                  device=None) -> torch.Tensor:
    """(B, h, w) masks, sample i's drawn from a counter-based hash of (seed, epoch, global index, position): the
    same sample gets the same mask whichever process, batch position or world size it lands in, so N processes
    train on exactly the masks one process would (and a resumed run on the masks of an uninterrupted one).

    Computed on ``device`` (default: the device of ``indices``) with integer arithmetic and one sort, no host
    loop and no sync; each sample keeps exactly ``num_visible(h*w, mask_ratio)`` patches (the smallest hashes)."""
    L, keep = h * w, _keep(h, w, mask_ratio)
    idx = indices.to(device if device is not None else indices.device, torch.long, non_blocking=True)
    m = 0xFFFFFFFF
    base = _mix32((seed * 1_000_003 + epoch) & m)  # a Python int: the same function on ints and tensors
    key = _mix32((_mix32(idx & m) ^ (idx >> 32) ^ base) & m)  # (B,) one key per sample
    pos = _mix32(torch.arange(L, device=idx.device))
    noise = _mix32(key.unsqueeze(1) ^ pos)  # (B, L): a bijection of the position per sample, so no ties
    ids_keep = noise.argsort(dim=1)[:, :keep]  # smallest draws kept, as MAE keeps the smallest noise
    mask = torch.ones(idx.shape[0], L, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, ids_keep, False)
    return mask.view(-1, h, w)
