"""Per-iteration learning rate: linear warmup, then half-cycle cosine to ``min_lr`` (official MAE/FCMAE/ConvNeXt
V2 ``adjust_learning_rate``), as a pure function of the step so resuming needs no scheduler state."""
from __future__ import annotations

import math


def cosine(t: float, start: float, end: float) -> float:
    """Half-cycle cosine from ``start`` (t = 0) to ``end`` (t = 1): the lr schedule and SLaK's prune-rate decay."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(step: float, total_steps: int, warmup_steps: float, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate at (possibly fractional) optimizer step ``step`` of ``total_steps``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return cosine(t, base_lr, min_lr)


def set_lr(optimizer, lr: float) -> None:
    """Apply ``lr`` to every param group, times the group's ``lr_scale`` (layer-wise decay)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
