"""Absolute position embeddings for patch grids.

* ``sincos_pos_embed_2d``: the fixed 2-D sin-cos table of MAE (``util/pos_embed.py get_2d_sincos_pos_embed``,
  also ConvMAE's), for any (h, w) grid. Channel layout as the official code: the first half encodes the column
  (w) coordinate, the second half the row (h) coordinate, each half ``[sin | cos]`` with
  ω_i = 1 / 10000^(i / (D/4)). Rows are the grid cells in row-major order; an optional zero row for the cls token
  comes first. Computed in float64 (the official numpy code is float64) and cast once at the end.
* ``resample_pos_embed``: interpolate a (learned or fixed) table to a new grid, keeping prefix (cls) rows, as
  timm's ``resample_abs_pos_embed`` (bicubic, antialias) or, with ``antialias=False``, MAE's
  ``interpolate_pos_embed``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d", "resample_pos_embed"]


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"grid size must be positive, got {(h, w)}")
    return int(h), int(w)


def sincos_pos_embed_1d(embed_dim: int, pos: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) ``[sin(pos·ω) | cos(pos·ω)]``, ω_i = temperature^(-i / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / temperature**omega  # (D/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2) outer product
    return torch.cat([out.sin(), out.cos()], dim=1)  # (M, D)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False,
                        temperature: float = 10000.0, dtype: torch.dtype = torch.float32,
                        device=None) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table: (h*w, D), or (1 + h*w, D) with a leading zero row when ``cls_token``.

    ``grid_size`` is an int (square) or ``(h, w)``; row ``i*w + j`` is grid cell (row i, column j).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    h, w = _pair(grid_size)
    # official: meshgrid(grid_w, grid_h) ('xy' indexing), so grid[0] is the column index and grid[1] the row index
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                torch.arange(w, dtype=torch.float64, device=device), indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_pos_embed_1d(embed_dim // 2, cols, temperature),
                     sincos_pos_embed_1d(embed_dim // 2, rows, temperature)], dim=1)  # (h*w, D)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.to(dtype)


def resample_pos_embed(posemb: torch.Tensor, new_size: int | tuple[int, int],
                       old_size: int | tuple[int, int] | None = None, num_prefix_tokens: int = 1,
                       interpolation: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Interpolate a (1, prefix + h*w, C) position table to ``new_size``; the prefix (cls) rows are kept.

    ``old_size`` defaults to a square grid. Defaults are timm's ``resample_abs_pos_embed``; MAE's
    ``interpolate_pos_embed`` is ``antialias=False`` (identical when upsampling, where antialias does nothing).
    Interpolation runs in float32 and the result keeps ``posemb``'s dtype.
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be (1, N, C), got shape {tuple(posemb.shape)}")
    new_h, new_w = _pair(new_size)
    n_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(f"posemb has {n_grid} grid rows (after {num_prefix_tokens} prefix rows), not a square "
                             "grid: pass old_size=(h, w)")
        old_size = (side, side)
    old_h, old_w = _pair(old_size)
    if old_h * old_w != n_grid:
        raise ValueError(f"posemb has {n_grid} grid rows but old_size {(old_h, old_w)} has {old_h * old_w} cells")
    if (old_h, old_w) == (new_h, new_w):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    c = posemb.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, c).permute(0, 3, 1, 2)  # (1, C, h, w)
    smooth = interpolation in ("bilinear", "bicubic")  # the modes F.interpolate allows antialias/align_corners for
    grid = F.interpolate(grid, size=(new_h, new_w), mode=interpolation, align_corners=False if smooth else None,
                         antialias=antialias and smooth)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, c).to(posemb.dtype)  # (1, h'*w', C)
    return torch.cat([prefix, grid], dim=1)
