"""Structural re-parameterization: turn training-time multi-branch blocks into their deploy form."""
from __future__ import annotations

import torch.nn as nn


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Call ``reparameterize()`` on every sub-module that has it (children before parents, so a parent sees
    already-merged children), switch to eval mode and return ``model`` (changed in place).

    Merging folds BatchNorm running statistics, so it is only valid for inference: the model is put in eval
    mode. Modules without the method are left as they are, so this is a no-op for families with nothing to merge.
    """
    model.eval()
    for module in reversed(list(model.modules())):  # post-order-ish: deeper modules come later in modules()
        fn = getattr(module, "reparameterize", None)
        if module is not model and callable(fn):
            fn()
    fn = getattr(model, "reparameterize", None)
    if callable(fn):
        fn()
    return model
