"""AdamW parameter groups: no weight decay on 1-D params, biases, GRN, layer scale and mask tokens; optional
layer-wise lr decay with the backbone's official layer ids (``layer_id(name, scheme)``)."""
from __future__ import annotations

import torch
import torch.nn as nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Names exempt from weight decay: ndim <= 1, ``*.bias``, and what the model's ``no_weight_decay()`` lists."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    nwd = getattr(model, "no_weight_decay", None)
    return names | (set(nwd()) if callable(nwd) else set())


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, scheme: str = "single",
                 backbone: nn.Module | None = None, backbone_prefix: str = "") -> list[dict]:
    """Groups keyed by (layer id, decay?) with ``lr_scale = layer_decay ** (max_id - id)``.

    ``backbone`` (default: ``model``) provides ``layer_id``/``num_lr_layers``; ``backbone_prefix`` is its name
    inside ``model`` (e.g. ``"encoder."``). Parameters outside the backbone get the top id (scale 1).
    """
    backbone = backbone if backbone is not None else model
    use_ld = layer_decay != 1.0
    if use_ld and not hasattr(backbone, "layer_id"):
        raise ValueError(f"layer_decay needs a backbone with layer ids; {type(backbone).__name__} has none")
    top = backbone.num_lr_layers(scheme) if use_ld else 0
    skip = no_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if use_ld and n.startswith(backbone_prefix):
            lid = backbone.layer_id(n[len(backbone_prefix):], scheme)
        else:
            lid = top
        decay = n not in skip
        g = groups.setdefault((lid, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (top - lid) if use_ld else 1.0, "layer_id": lid})
        g["params"].append(p)
        g["names"].append(n)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), layer_decay: float = 1.0,
                    scheme: str = "single", backbone: nn.Module | None = None, backbone_prefix: str = ""):
    groups = param_groups(model, weight_decay, layer_decay, scheme, backbone, backbone_prefix)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    # names are kept in the groups for inspection; torch ignores extra keys
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
