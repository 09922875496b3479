"""Feature-collapse analysis of ConvNeXt V2 (paper §3.2): per layer, the average pairwise cosine distance
between channel activation maps, ``1/C² Σ_i Σ_j (1 - cos(X_i, X_j)) / 2`` per image, averaged over images.
Low distance = channels that all look alike (collapse); GRN is meant to keep it high.

``where='block'`` measures each block's output (the residual stream); ``where='mlp'`` the expansion layer
(4C channels, after GELU, before GRN), where GRN acts.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ._plot import pyplot, save


def pairwise_cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, W, C) channels-last -> (B,) mean over channel pairs of (1 - cos) / 2."""
    v = F.normalize(x.flatten(1, 2).transpose(1, 2).float(), dim=2)  # (B, C, HW)
    sim = v @ v.transpose(1, 2)  # (B, C, C)
    return ((1 - sim) / 2).mean(dim=(1, 2))


@torch.no_grad()
def feature_collapse(model, images: torch.Tensor, where: str = "block", batch_size: int = 32) -> list[dict]:
    """``[{layer, name, distance}]`` for every block of a ConvNeXt, over ``images`` (N, C, H, W).

    Features are read at the model's documented hook points (``ConvNeXt.feature_modules``), which run in every
    mode (the no-grad fast path included)."""
    points = model.feature_modules(where)  # ValueError naming the choices for another ``where``
    sums = torch.zeros(len(points), dtype=torch.float64)
    calls = [0] * len(points)

    def reader(k: int):
        def hook(module, args, out):
            nhwc = out.permute(0, 2, 3, 1) if where == "block" else out  # (B, H, W, C)
            sums[k] += pairwise_cosine_distance(nhwc).double().sum()
            calls[k] += 1
        return hook

    hooks = [m.register_forward_hook(reader(k)) for k, (_, m) in enumerate(points)]
    model.eval()
    try:
        chunks = images.split(batch_size)
        for chunk in chunks:
            model.forward_features(chunk)
    finally:
        for h in hooks:
            h.remove()
    if calls != [len(chunks)] * len(points):  # a feature the forward did not produce must not read as 0.0
        raise RuntimeError(f"feature hook points ran {calls} times for {len(chunks)} batches: the model's forward "
                           f"skipped a documented '{where}' feature point")
    n = len(images)
    return [dict(layer=k, name=name, distance=(sums[k] / n).item()) for k, (name, _) in enumerate(points)]


def plot_collapse(results: dict[str, list[dict]], path: str | Path, title: str | None = None) -> Path:
    """One line per model: distance against relative depth (0..1), so models of other depths compare."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    top = 0.0
    for label, rows in results.items():
        n = max(1, len(rows) - 1)
        ax.plot([r["layer"] / n for r in rows], [r["distance"] for r in rows], "o-", ms=3, label=label)
        top = max([top] + [r["distance"] for r in rows])
    # from 0, with head-room above the highest point so no line sits on the frame (the distance can exceed 0.5)
    ax.set(xlabel="relative layer depth", ylabel="avg. pairwise cosine distance",
           title=title or "feature collapse (higher = more diverse channels)", ylim=(0, top * 1.15 or 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)
