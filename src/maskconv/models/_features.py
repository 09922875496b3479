"""What every family's ``forward_intermediates`` shares (timm's feature contract)."""
from __future__ import annotations

__all__ = ["feature_indices"]


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
