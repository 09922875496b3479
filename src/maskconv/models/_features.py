"""What every family's ``forward_intermediates`` and ``check_input`` share (timm's feature contract)."""
from __future__ import annotations

import torch

__all__ = ["check_image_input", "feature_indices"]


def feature_indices(indices, n: int, unit: str = "stages") -> list[int]:
    """timm's ``indices`` (None = all, int = the last n, list = these, negative from the end) -> sorted list of
    ``n`` stage (or block) indices; ``unit`` names them in the error message."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: the model has {n} {unit}")
        return list(range(n - indices, n))
    idx = [i % n if -n <= i < n else None for i in indices]
    if None in idx:
        raise ValueError(f"indices {list(indices)} out of range for {n} {unit}")
    return sorted(set(idx))


def check_image_input(x: torch.Tensor, in_chans: int, multiple: int, what: str) -> None:
    """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor whose H and W are
    multiples of ``multiple`` (``what`` names it: "the patch size", "the model's total stride")."""
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input has {x.shape[1]} channels but the model was built with in_chans={in_chans} "
                         f"(create_model(..., in_chans={x.shape[1]}) adapts pretrained weights)")
    h, w = x.shape[-2:]
    k = multiple
    if h % k or w % k:
        raise ValueError(f"input size {h}x{w} is not divisible by {what} {k}; resize or pad to a multiple of {k} "
                         f"(e.g. {max(1, round(h / k)) * k}x{max(1, round(w / k)) * k})")
