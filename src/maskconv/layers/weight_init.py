"""Weight initialisers shared by a backbone and the objectives that wrap it (applied with ``module.apply``)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["init_mae", "init_trunc_normal"]


def init_trunc_normal(m: nn.Module) -> None:
    """trunc_normal(std .02, bounds ±2) weights and zero biases for every conv and linear (ConvNeXt official + timm;
    FCMAE's decoder)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_mae(m: nn.Module) -> None:
    """MAE's ``_init_weights`` (facebookresearch/mae ``models_mae.py``; also official ConvMAE's): xavier_uniform
    Linear weights, zero biases; LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
