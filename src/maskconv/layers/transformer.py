"""Pre-norm Transformer pieces (ViT / MAE / ConvMAE) with timm's attribute names, so state-dict keys match
timm's ``vision_transformer.Block``: ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``. The MLP is the shared ``layers.mlp.Mlp``.

Tokens are (B, N, C). Attention runs through ``F.scaled_dot_product_attention`` (fused kernels where the
backend has them); the math is softmax(q kᵀ / sqrt(head_dim)) v, as timm and MAE.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from .mlp import GELU, Mlp
from .norm import LayerNorm

__all__ = ["Attention", "Block", "LayerScale"]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (timm's ``qkv`` weight layout: [q; k; v] rows)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop  # a rate (SDPA applies it), not a module: no weights either way
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DeiT-3), timm's ``ls*.gamma`` key."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + drop_path(ls1(attn(norm1(x)))), then x + drop_path(ls2(mlp(norm2(x)))). LayerNorm eps 1e-6 as
    timm's ViT and MAE; ``init_values`` enables layer scale (off in ViT/MAE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, init_values: float | None = None,
                 drop_path: float = 0.0, act_layer: Callable[[], nn.Module] = GELU,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        # torchvision's stochastic depth, per sample ("row"), as timm's DropPath
        self.drop_path1 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, N, C)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
