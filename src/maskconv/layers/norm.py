"""LayerNorm variants used by ConvNeXt-style models.

Statistics are computed in float32 for half-precision inputs: fp16 LayerNorm overflows on ConvNeXt
activations (facebookresearch/ConvNeXt#80), and bf16 loses too many bits in the variance.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def layer_norm_fp32(x: torch.Tensor, shape, weight, bias, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dims, in float32 when ``x`` is fp16/bf16; returns ``x.dtype``."""
    if x.dtype in _LOW_PRECISION:
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        # autocast would otherwise be free to run layer_norm in low precision (CPU autocast does).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), shape, w, b, eps).to(x.dtype)
    return F.layer_norm(x, shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim (channels-last input ``(..., C)``), fp32 statistics."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, at every position (not over C,H,W).

    Implemented as a permute to NHWC + ``F.layer_norm``: with a channels_last input the permute is a free
    view, so no copy is made.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self.forward_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # via (B, H, W, C)

    def forward_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation over the last dim of channels-last data: (B, H, W, C) maps or (N, C) tokens
        (the masked objectives' gathered paths run the model's LayerNorm2d layers on tokens this way)."""
        return layer_norm_fp32(x, self.normalized_shape, self.weight, self.bias, self.eps)
