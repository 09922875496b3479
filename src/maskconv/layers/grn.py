"""Global Response Normalization (ConvNeXt V2), channels-last.

y = x + bias + weight * (x * Nx),  Nx = G / (mean_c G + eps),  G[b, c] = ||x[b, :, :, c]||_2

Per-sample statistics, as the dense official model, timm and the JAX recipe (the official MinkowskiGRN pools
over the whole batch: an open upstream bug). The elementwise ops and their order are timm's / the official
code's (``x + addcmul(bias, weight, x * Nx)``): a fused ``x * (1 + weight * Nx)`` with a square-and-sum norm
moved convnextv2_huge's logits by ~1.3e-5, past the 1e-5 parity bound. The norm is ``x.norm`` (timm's op on
timm's layout) except for the conv-MLP sizes (atto..nano), where a square-and-sum is 2-3x faster and stays
~5e-7 from timm's logits (timm's strided norm there is not bit-reproducible by any other layout either).
For fp16/bf16 inputs the norm is taken in float32: a sum of squares over H*W overflows fp16 long before the
activations do (ConvNeXt-V2#66).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _spatial_norm(x: torch.Tensor, sumsq_stats: bool) -> torch.Tensor:
    """||x||_2 over (H, W) of a channels-last (B, H, W, C) tensor, as (B, 1, 1, C).

    ``sumsq_stats``: sqrt(sum(x * x)), a vectorised outer reduction over the contiguous C: 2-3x faster on CPU than
    torch's strided norm at the conv-MLP sizes' maps (4C = 160..640 channels), ~1e-6 relative rounding apart."""
    if sumsq_stats:
        return (x * x).sum(dim=(1, 2), keepdim=True).sqrt()
    return x.norm(p=2, dim=(1, 2), keepdim=True)


def _stats(x: torch.Tensor, eps: float, sumsq_stats: bool):
    """(g, denom, nx): g = ||x||_hw (B, 1, 1, C) and denom = mean_c(g) + eps, in float32 for half inputs;
    nx = g / denom in x's dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = _spatial_norm(xf, sumsq_stats)  # (B, 1, 1, C)
    denom = g.mean(dim=-1, keepdim=True) + eps  # (B, 1, 1, 1)
    return g, denom, (g / denom).to(x.dtype)


def _grn_forward(x, weight, bias, eps: float, sumsq_stats: bool):
    """timm's op sequence, ``x + addcmul(bias, weight, x * nx)`` (so the same fp32 rounding), computed in the one
    buffer of ``x * nx``: fresh large CPU buffers are costly here (past glibc's mmap threshold each one is new
    pages, faulted in and zeroed by the kernel on first touch). Same bits (x + u == u + x). Not differentiable by
    autograd (in-place): callers run it without autograd. Returns ``(y, g, denom, nx)`` (see ``_stats``)."""
    g, denom, nx = _stats(x, eps, sumsq_stats)
    t = x * nx  # (B, H, W, C)
    return torch.addcmul(bias.to(x.dtype), weight.to(x.dtype), t, out=t).add_(x), g, denom, nx


class _GRNFunction(torch.autograd.Function):
    """GRN with a hand-written backward; the forward is ``_grn_forward`` (bit-identical to the plain ops).

    Autograd through the plain ops makes ~10 full-size passes in backward (grad of the add, the addcmul, the
    x * nx product, the norm with its masked_fill, and the accumulations) and keeps x * nx alive. All of it
    reduces to two per-(sample, channel) sums and one fused elementwise pass:

        S = sum_hw(gy * x),  dL/dbias = sum(gy),  dL/dweight = sum_b(S * nx),  dL/dnx = weight * S
        dL/dg = dL/dnx / denom - sum_c(dL/dnx * g) / (C * denom^2)           (nx = g / (mean_c g + eps))
        dL/dx = gy * (1 + weight * nx) + x * dL/dg / g                        (0 where g = 0, as norm's backward)

    The gradient stays in x's (channels-last) layout. Per-(sample, channel) terms are computed in float32 for
    half-precision inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, sumsq_stats: bool):
        y, g, denom, nx = _grn_forward(x, weight, bias, eps, sumsq_stats)  # no autograd inside forward
        ctx.save_for_backward(x, weight, g, denom, nx)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, g, denom, nx = ctx.saved_tensors
        f32 = torch.float32
        w, nxf = weight.float(), nx.float()
        buf = gy * x  # (B, H, W, C): the one full-size buffer of the backward, reused for dL/dx
        s = torch.sum(buf, dim=(1, 2), keepdim=True, dtype=f32)  # (B, 1, 1, C)
        g_weight = (s * nxf).sum(dim=(0, 1, 2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        g_bias = gy.sum(dim=(0, 1, 2), dtype=f32).to(weight.dtype) if ctx.needs_input_grad[2] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            g_nx = w * s  # (B, 1, 1, C)
            g_g = g_nx / denom - (g_nx * g).sum(dim=-1, keepdim=True) / (g.shape[-1] * denom * denom)
            coef = (g_g / g).masked_fill(g == 0, 0).to(x.dtype)
            torch.mul(gy, (1 + w * nxf).to(x.dtype), out=buf)
            g_x = torch.addcmul(buf, x, coef, out=buf)  # (B, H, W, C), x's layout
        return g_x, g_weight, g_bias, None, None


def grn_nx(x: torch.Tensor, eps: float = 1e-6, sumsq_stats: bool = False) -> torch.Tensor:
    """Divisive-normalised response ``Nx`` (B, 1, 1, C) of a channels-last ``x`` (B, H, W, C), in x's dtype
    (statistics in float32 for half-precision inputs). ``sumsq_stats``: see ``_spatial_norm``."""
    return _stats(x, eps, sumsq_stats)[2]


class GlobalResponseNorm(nn.Module):
    """GRN over the last dim of ``(B, H, W, C)``. Keys ``weight``/``bias`` of shape (C,) as timm's."""

    def __init__(self, dim: int, eps: float = 1e-6, sumsq_stats: bool = False):
        super().__init__()
        self.eps, self.sumsq_stats = eps, sumsq_stats
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma: zero init -> identity at init
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> same, in x's dtype
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return _GRNFunction.apply(x, self.weight, self.bias, self.eps, self.sumsq_stats)
        return _grn_forward(x, self.weight, self.bias, self.eps, self.sumsq_stats)[0]  # inference / export
