"""Visible-token gather / scatter shared by the masked objectives' gathered paths (FCMAE, ConvMAE).

Tokens are sample-major rows (N_vis, C) at flat indices ``idx`` of a (B, H, W) grid (``masking.visible_index``);
every sample keeps the same count, so ``(N_vis, C).view(B, N_vis // B, ...)`` is a per-sample view.
"""
from __future__ import annotations

import torch

__all__ = ["gather_tokens", "scatter_tokens"]


def gather_tokens(nhwc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (N_vis, C) rows at flat indices ``idx``."""
    return nhwc.reshape(-1, nhwc.shape[-1]).index_select(0, idx)


def scatter_tokens(tokens: torch.Tensor, idx: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """(N_vis, C) -> (B, C, H, W) channels_last map, zero at masked cells."""
    c = tokens.shape[-1]
    full = tokens.new_zeros(b * h * w, c).index_copy(0, idx, tokens)
    return full.view(b, h, w, c).permute(0, 3, 1, 2)
