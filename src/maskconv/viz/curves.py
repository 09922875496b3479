"""Training curves from ``metrics.jsonl`` and confusion matrices (matplotlib imported lazily)."""
from __future__ import annotations

import json
from pathlib import Path

from ._plot import pyplot, save


def read_metrics(run: str | Path) -> list[dict]:
    from ..engine.rundir import RunDir

    path = Path(run) / RunDir.METRICS if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """PNG of loss and lr per step, and validation accuracy per epoch when present."""
    plt = pyplot()
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if "train_loss" in r]
    acc = [r for r in epochs if "val_top1" in r]
    n = 2 + bool(acc)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="step")
    axes[0].plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean")
    axes[0].set(xlabel="optimizer step", ylabel="loss", title="training loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    axes[1].set(xlabel="optimizer step", ylabel="learning rate", title="schedule")
    if acc:
        axes[2].plot([r["epoch"] for r in acc], [r["val_top1"] for r in acc], "o-", label="top-1")
        if all("val_top5" in r for r in acc):  # top-5 is logged only with more than 5 classes
            axes[2].plot([r["epoch"] for r in acc], [r["val_top5"] for r in acc], "s--", label="top-5")
        axes[2].set(xlabel="epoch", ylabel="accuracy (%)", title="validation")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    from ..engine.rundir import RunDir

    default = (Path(run) if Path(run).is_dir() else Path(run).parent) / RunDir.CURVES
    return save(fig, out or default, dpi=100)


def plot_confusion(conf, path: str | Path, classes: list[str] | None = None,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows = truth) with the counts written in, class names on both axes."""
    plt = pyplot()
    import numpy as np

    c = np.asarray(conf, dtype=float)
    norm = c / np.maximum(c.sum(1, keepdims=True), 1)
    k = len(c)
    names = classes or [str(i) for i in range(k)]
    margin = 0.08 * max(len(n) for n in names)  # inches for the longest name, so labels are not cut off
    width = 1.6 + margin + 0.45 * k
    fig, ax = plt.subplots(figsize=(width, 1.4 + margin + 0.45 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if c[i, j]:
                ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    import textwrap

    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(textwrap.fill(title, int(width * 11)), fontsize=9)  # ~11 characters per inch at 9 pt
    return save(fig, path, dpi=100)
