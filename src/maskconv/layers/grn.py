"""Global Response Normalization (ConvNeXt V2), channels-last.

y = x + bias + weight * (x * Nx),  Nx = G / (mean_c G + eps),  G[b, c] = ||x[b, :, :, c]||_2

Per-sample statistics, as the dense official model, timm and the JAX recipe (the official MinkowskiGRN pools
over the whole batch: an open upstream bug). The ops and their order are timm's / the official code's
(``x.norm`` then ``x + addcmul(bias, weight, x * Nx)``): any other fp32 rounding (a square-and-sum norm, a
fused ``x * (1 + weight * Nx)``) moves convnextv2_huge's logits by ~1.3e-5, past the 1e-5 parity bound.
For fp16/bf16 inputs the norm is taken in float32: a sum of squares over H*W overflows fp16 long before the
activations do (ConvNeXt-V2#66).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _norm_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) channels-last -> ||x||_2 over (H, W) as (B, 1, 1, C), reduced on an NCHW-contiguous copy."""
    return x.permute(0, 3, 1, 2).contiguous().norm(p=2, dim=(2, 3), keepdim=True).permute(0, 2, 3, 1)


class _SpatialNormNCHW(torch.autograd.Function):
    """||x||_2 over (H, W) of a channels-last ``x`` (B, H, W, C), reduced on an NCHW-contiguous copy (timm's
    rounding for its conv-MLP models). Autograd through ``permute().contiguous().norm()`` would hand back an
    NCHW-strided gradient that meets the NHWC gradients of the rest of the block: every later add/mul then
    runs on mixed layouts, several times slower on CPU. The backward here is norm's own, d||x||/dx = x / ||x||
    (0 where the norm is 0), computed in x's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        g = _norm_nchw(x)
        ctx.save_for_backward(x, g)
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, g = ctx.saved_tensors
        return x * (grad / g).masked_fill(g == 0, 0)  # (B, H, W, C)


def grn_nx(x: torch.Tensor, eps: float = 1e-6, nchw_stats: bool = False) -> torch.Tensor:
    """Divisive-normalised response ``Nx`` (B, 1, 1, C) of a channels-last ``x`` (B, H, W, C), in x's dtype
    (statistics in float32 for half-precision inputs).

    ``nchw_stats``: reduce an NCHW-contiguous copy over its contiguous (H, W), as timm does for its conv-MLP
    models (atto..nano): the same rounding as timm there, and a contiguous reduction is far faster on CPU than
    the strided one over NHWC (the copy costs one pass).
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if nchw_stats:
        # the custom backward only where a gradient is taken: inference / export trace the plain ops
        gx = _SpatialNormNCHW.apply(xf) if torch.is_grad_enabled() and xf.requires_grad else _norm_nchw(xf)
    else:
        gx = xf.norm(p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
    return (gx / (gx.mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


class GlobalResponseNorm(nn.Module):
    """GRN over the last dim of ``(B, H, W, C)``. Keys ``weight``/``bias`` of shape (C,) as timm's."""

    def __init__(self, dim: int, eps: float = 1e-6, nchw_stats: bool = False):
        super().__init__()
        self.eps, self.nchw_stats = eps, nchw_stats
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma: zero init -> identity at init
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        nx = grn_nx(x, self.eps, self.nchw_stats)
        return x + torch.addcmul(self.bias.to(x.dtype), self.weight.to(x.dtype), x * nx)  # keeps x's dtype
