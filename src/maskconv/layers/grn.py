"""Global Response Normalization (ConvNeXt V2), channels-last.

y = x + bias + weight * (x * Nx),  Nx = G / (mean_c G + eps),  G[b, c] = ||x[b, :, :, c]||_2

Per-sample statistics, as the dense official model, timm and the JAX recipe (the official MinkowskiGRN pools
over the whole batch: an open upstream bug). The norm is taken in float32: a sum of squares over H*W overflows
fp16 long before the activations do (ConvNeXt-V2#66).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def grn_nx(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divisive-normalised response ``Nx`` (B, 1, 1, C) of a channels-last ``x`` (B, H, W, C), float32."""
    gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
    return gx / (gx.mean(dim=-1, keepdim=True) + eps)


class GlobalResponseNorm(nn.Module):
    """GRN over the last dim of ``(B, H, W, C)``. Keys ``weight``/``bias`` of shape (C,) as timm's."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma: zero init -> identity at init
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        nx = grn_nx(x, self.eps).to(x.dtype)
        return torch.addcmul(self.bias, self.weight, x * nx) + x
