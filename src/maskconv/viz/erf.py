"""Effective receptive field (ERF) of any registered backbone, as RepLKNet / SLaK measure it
(RepLKNet-pytorch ``erf/visualize_erf.py`` + ``erf/analyze_erf.py``, reused by SLaK).

For each image: the last stage's feature map (``forward_intermediates``, before any final norm), score =
ReLU(features at the central pixel).sum() (at an even side: the mean of the two middle pixels, see ``central``),
gradient w.r.t. the input, ReLU, summed over channels; the maps are
averaged over images. Analysis: ``log10(x + 1)``, divided by its max, then the smallest centred square that
holds more than a fraction ``t`` of the total, as side length and area ratio. A wider ERF = larger ratios.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ._plot import pyplot, save

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)  # as RepLKNet's analyze_erf.py


def last_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last stage's output (B, C, h, w) through the timm contract, so no model needs its own code."""
    feats = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
    if feats.ndim == 3:  # (B, L, C) tokens (a ViT without NCHW output): a square grid of patches
        b, n, c = feats.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{type(model).__name__}.forward_intermediates gave {n} tokens, not a square grid: "
                             "return NCHW maps (without prefix tokens) for the ERF")
        feats = feats.transpose(1, 2).reshape(b, c, side, side)
    if feats.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) last feature map, got shape {tuple(feats.shape)}")
    return feats


def central(feats: torch.Tensor) -> torch.Tensor:
    """The output pixel at the centre of a (B, C, h, w) map, (B, C). At an even side the centre falls between
    two pixels, so both are averaged: the ERF is then centred on the input's centre (the official
    ``[h // 2, w // 2]`` pixel sits half an output stride below-right of it); at odd sides it is that pixel."""
    h, w = feats.shape[-2:]
    rows = slice(h // 2 - 1, h // 2 + 1) if h % 2 == 0 else slice(h // 2, h // 2 + 1)
    cols = slice(w // 2 - 1, w // 2 + 1) if w % 2 == 0 else slice(w // 2, w // 2 + 1)
    return feats[:, :, rows, cols].mean(dim=(2, 3))


def erf_map(model: nn.Module, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean over ``images`` (N, C, H, W) of the input-gradient map of the central output pixel -> (H, W), a
    CPU float tensor whatever device the model and images are on.

    Images in one batch do not interact in eval mode, so the gradient of the summed scores is each image's own
    gradient and the per-image ReLU before summing is the original per-image computation.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected images as a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    was_training = model.training
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for chunk in images.split(batch_size):
            x = chunk.detach().clone().requires_grad_(True)
            feats = last_feature_map(model, x)  # (B, C, h, w)
            score = torch.relu(central(feats)).sum()
            (grad,) = torch.autograd.grad(score, x)  # (B, C_in, H, W)
            total += torch.relu(grad).sum(dim=(0, 1)).double().cpu()  # the map lives on the CPU (plots, JSON)
    finally:
        model.train(was_training)
    return (total / len(images)).float()


def high_contribution_area(erf: torch.Tensor, thresholds=THRESHOLDS) -> list[dict]:
    """``[{t, side, area_ratio}]``: for each ``t``, the smallest centred square (odd side, from 3, clipped to the
    map) whose share of the log-scaled, max-normalised map is above ``t`` (analyze_erf.py's ``get_rectangle``)."""
    if erf.ndim != 2:
        raise ValueError(f"expected an (H, W) ERF map, got shape {tuple(erf.shape)}")
    if (erf < 0).any() or not torch.isfinite(erf).all():
        raise ValueError("the ERF map must be finite and non-negative (ReLU'd gradients)")
    if erf.max() <= 0:
        raise ValueError("the ERF map is all zero: the central output does not depend on the input "
                         "(dead ReLUs or an all-zero feature map?)")
    for t in thresholds:
        if not 0 < t < 1:
            raise ValueError(f"threshold {t} must be in (0, 1)")
    data = torch.log10(erf.double() + 1)  # the scores span orders of magnitude
    data = data / data.max()
    h, w = data.shape
    cy, cx = h // 2, w // 2
    total = data.sum()
    # share of the square of half-size i (side 2i+1) for every i, the last one covering the whole map
    half_sizes = range(1, max(h, w) // 2 + 1)
    shares, sides = [], []
    for i in half_sizes:
        win = data[max(0, cy - i): cy + i + 1, max(0, cx - i): cx + i + 1]
        shares.append((win.sum() / total).item())
        sides.append(win.shape)
    out = []
    for t in thresholds:
        k = next((k for k, s in enumerate(shares) if s > t), len(shares) - 1)
        sh, sw = sides[k]
        out.append(dict(t=t, side=max(sh, sw), area_ratio=sh * sw / (h * w)))
    return out


def plot_erf(maps: dict[str, torch.Tensor], path: str | Path, ratios: dict[str, list[dict]] | None = None,
             title: str | None = None) -> Path:
    """Several models' log-scaled, max-normalised ERF heat maps side by side, their area ratios in the titles."""
    if not maps:
        raise ValueError("no ERF map to plot")
    import textwrap

    plt = pyplot()
    n = len(maps)
    width = 4.2 * n
    lines = textwrap.wrap(title, width=int(width * 13)) if title else []  # ~13 characters per inch at 10 pt
    fig, axes = plt.subplots(1, n, figsize=(width, 4.8 + 0.2 * len(lines)), squeeze=False)
    for ax, (label, m) in zip(axes[0], maps.items()):
        data = torch.log10(m.double() + 1)
        data = (data / data.max()).numpy()
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1)
        rows = (ratios or {}).get(label) or high_contribution_area(m)
        pairs = [f"t={r['t']:g}: {100 * r['area_ratio']:.1f}%" for r in rows]
        text = "\n".join(["  ".join(pairs[i:i + 2]) for i in range(0, len(pairs), 2)])  # two per line: fits
        ax.set_title("\n".join(textwrap.wrap(label, 40) + [text]), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    return save(fig, path, dpi=110, top=1 - (0.25 + 0.18 * len(lines)) / fig.get_figheight() if lines else 1.0)
