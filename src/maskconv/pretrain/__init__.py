"""Pretraining objectives. Each wraps a backbone and returns an output with ``.loss``.

``create_objective("fcmae", model="convnextv2_atto", mask_ratio=0.6, ...)`` or ``encoder=<module>``.
"""
from __future__ import annotations

import inspect

import torch.nn as nn

from ._io import load_objective, save_objective
from .convmae import ConvMAE, ConvMAEOutput
from .fcmae import FCMAE, FCMAEOutput
from .mae import MAE, MAEOutput
from .masking import random_mask
from .targets import patchify, unpatchify

_OBJECTIVES = {"fcmae": FCMAE, "convmae": ConvMAE, "mae": MAE}


def list_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def create_objective(name: str, model: str | None = None, encoder: nn.Module | None = None,
                     model_kwargs: dict | None = None, **kwargs) -> nn.Module:
    """Build objective ``name`` around ``encoder``, or around ``create_model(model, num_classes=0,
    **model_kwargs)`` (e.g. ``model_kwargs=dict(in_chans=1, stem_stride=2)``)."""
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(list_objectives())}")
    if (model is None) == (encoder is None):
        raise ValueError("pass exactly one of model=<registered name> or encoder=<module>")
    cls = _OBJECTIVES[name]
    options = [p for p in inspect.signature(cls).parameters if p != "encoder"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:  # e.g. objective.sparse with MAE: a clear error, not a TypeError from __init__
        raise ValueError(f"objective {name!r} has no option {', '.join(unknown)}; its options: {', '.join(options)}")
    if encoder is None:
        from ..models import create_model

        encoder = create_model(model, num_classes=0, **(model_kwargs or {}))
    return cls(encoder, **kwargs)


__all__ = ["FCMAE", "FCMAEOutput", "create_objective", "list_objectives", "load_objective", "patchify", "random_mask",
           "save_objective", "unpatchify", "ConvMAE", "ConvMAEOutput", "MAE", "MAEOutput"]
