"""Optimizer parameter groups: no weight decay on 1-D params, biases, GRN, layer scale and mask tokens; optional
layer-wise lr decay with the backbone's official layer ids (``layer_id(name, scheme)``). AdamW, or LARS (MAE's
linear probe)."""
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


class LARS(torch.optim.Optimizer):
    """LARS as MAE's linear probe runs it (facebookresearch/mae util/lars.py, from MoCo v3): for a parameter with
    more than one dimension, add weight decay to the gradient, then scale it by ``trust_coefficient * ||p|| /
    ||g||`` (by 1 when either norm is 0); 1-D parameters (biases, norms) get neither. Then SGD with momentum
    (``mu = momentum * mu + g``, ``p -= lr * mu``; no dampening, no Nesterov). timm's ``Lars`` differs (eps in the
    ratio, ``||g|| + wd ||p||`` as its denominator, adaptation chosen per group): see docs/DECISIONS.md."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not a bias or a norm's weight
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w, u = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    one = torch.ones_like(w)  # torch.where: no host sync on the norms
                    dp = dp.mul(torch.where(w > 0, torch.where(u > 0, g["trust_coefficient"] * w / u, one), one))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), layer_decay: float = 1.0,
                    scheme: str = "single", backbone: nn.Module | None = None, backbone_prefix: str = "",
                    name: str = "adamw"):
    """``name``: ``adamw`` (``betas``) or ``lars`` (``LARS``, momentum 0.9, trust coefficient 0.001: MAE's probe)."""
    groups = param_groups(model, weight_decay, layer_decay, scheme, backbone, backbone_prefix)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    # names are kept in the groups for inspection; torch ignores extra keys
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        from ..config import OptimizerName, one_of

        raise ValueError(f"optim.name={name!r}: must be {one_of(OptimizerName)}")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=can_fuse([p for g in groups for p in g["params"]]))


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel takes these parameters: plain float tensors on the CPU or one CUDA device (not
    FSDP's DTensors). On the CPU it is ~5x faster than the default for-each form (convnextv2_atto FCMAE's 7.3 M
    parameters: 6.7 vs 33.6 ms a step, one thread), a fixed cost of every step; the update is the same rule,
    equal to the for-each form to float rounding (tests/engine/test_optim_schedule.py)."""
    from torch.distributed.tensor import DTensor

    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                    and not isinstance(p, DTensor) for p in params))
