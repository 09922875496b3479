"""The channel MLP of every family (ConvNeXt, ViT / MAE Transformer blocks, ConvMAE CBlock): fc1 -> GELU ->
dropout -> [GRN] -> fc2 -> dropout over the last dim, as timm's ``Mlp`` / ``GlobalResponseNormMlp`` (one class:
the GRN is an option, its keys ``grn.weight`` / ``grn.bias`` exist only when it is on).

Weights are ``nn.Linear`` or, with ``use_conv``, 1x1 ``nn.Conv2d`` (timm's ``conv_mlp`` / ConvMAE ``CMlp``
layout): only the stored shape differs, the op is the same on channels-last data (``pointwise``). 4-D inputs are
channels-last (B, H, W, C) maps, or with ``channels_first`` (B, C, H, W) maps run through the 1x1 convs as they are
(ConvMAE's CBlock: its GELU then runs on the NCHW tensor, which keeps the official block's float rounding).

The activation step is the module ``act`` in every mode: without autograd it writes GELU into fc1's fresh
output (``GELU(inplace=True)``: same kernel, same bits, one hidden-wide buffer fewer), with autograd it runs out of
place. So a forward hook on ``mlp.act`` sees the activation whether or not a gradient is taken.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grn import GlobalResponseNorm

__all__ = ["GELU", "Mlp", "pointwise"]


def pointwise(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Apply a Linear or 1x1 Conv2d over the last dim of ``(..., C)``. A 1x1 conv on 4-D channels-last data
    (B, H, W, C) runs as oneDNN's 1x1 convolution on the NCHW view (faster than addmm at large maps on CPU);
    on tokens (N, C) it runs as a Linear with the flattened weight."""
    w = layer.weight
    if w.ndim == 4 and x.ndim == 4:
        return F.conv2d(x.permute(0, 3, 1, 2), w, layer.bias).permute(0, 2, 3, 1)
    return F.linear(x, w.flatten(1) if w.ndim == 4 else w, layer.bias)


class GELU(nn.GELU):
    """``nn.GELU`` that, with ``inplace=True`` and no autograd, writes into its input (as ``nn.ReLU(inplace=True)``;
    the caller hands it a fresh buffer nobody else reads). With autograd it always runs out of place."""

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__(approximate=approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        return F.gelu(x, approximate=self.approximate)


class Mlp(nn.Module):
    """fc1 -> act -> drop1 -> [GRN] -> fc2 -> drop2 over the channels: the last dim of ``(..., C)``, or dim 1 of a
    (B, C, H, W) map with ``channels_first``.

    ``use_grn``: ConvNeXt V2's GRN on the hidden activations (``grn_sumsq_stats``: its square-and-sum statistics,
    see ``layers/grn.py``); GRN needs (B, H, W, C) or a per-sample (B, L, 1, C) view. ``use_conv``: 1x1 conv
    weights. ``act_layer=GELU`` (the default) is built in-place-capable; any other layer is built as given.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = GELU, drop: float = 0.0, use_grn: bool = False,
                 use_conv: bool = False, grn_sumsq_stats: bool = False, channels_first: bool = False):
        super().__init__()
        if channels_first and (use_grn or not use_conv):
            raise ValueError("channels_first needs use_conv=True and no GRN (GRN pools channels-last maps)")
        self.channels_first = channels_first
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if use_conv else nn.Linear
        self.fc1 = make(in_features, hidden_features)
        self.act = GELU(inplace=True) if act_layer is GELU else act_layer()
        self.drop1 = nn.Dropout(drop)
        self.grn = GlobalResponseNorm(hidden_features, sumsq_stats=grn_sumsq_stats) if use_grn else None
        self.fc2 = make(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def hidden(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) -> (..., hidden): fc1 -> act -> dropout -> GRN. ``masked`` (bool, broadcastable to the hidden
        map, True = masked): those cells are zeroed before GRN, so its statistics are over the visible cells only
        (FCMAE's dense-masked path); without a GRN it changes nothing."""
        x = self.drop1(self.act(self._fc(x, self.fc1)))
        if self.grn is not None:
            if masked is not None:
                x = x.masked_fill(masked, 0)
            x = self.grn(x)
        return x

    def forward(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:  # (..., C)
        return self.drop2(self._fc(self.hidden(x, masked), self.fc2))  # (..., out)

    def _fc(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return layer(x) if self.channels_first and x.ndim == 4 else pointwise(x, layer)
