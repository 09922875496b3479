"""The roadmap table and chart: every step of ``models/roadmap.py`` with its params and GMACs as the library counts
them, next to the ConvNeXt paper's GFLOPs and ImageNet top-1 (Liu et al., CVPR 2022, Section 2, Figure 2), and a
chart in the style of the paper's Figure 2 (``maskconv roadmap``; ``bench/roadmap.py`` adds measured accuracies).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..commands import Command
from ..models.roadmap import ROADMAP, SWIN_T, step_model_name
from ._plot import pyplot, save

__all__ = ["RoadmapRow", "format_roadmap", "plot_roadmap", "roadmap_table", "write_roadmap"]

_COLORS = {"baseline": "#9e9e9e", "macro design": "#8fb3d9", "ResNeXt": "#b7d98f", "inverted bottleneck": "#f2c58f",
           "large kernel": "#d9a3c7", "micro design": "#a3d9d2", "ConvNeXt-T": "#e07b6a"}


@dataclass
class RoadmapRow:
    index: int
    model: str
    change: str
    params_m: float  # measured, 1000-class head
    gmacs: float  # measured at img_size (FlopCounterMode multiply-adds; the paper's "GFLOPs" are multiply-adds)
    paper_gflops: float | None
    paper_top1: float | None
    source: str
    group: str


def roadmap_table(img_size: int = 224) -> list[RoadmapRow]:
    """One row per roadmap step; params and GMACs measured on a meta-device model (no memory, no time)."""
    from ..models.measure import count_macs
    from ..models import create_model

    rows = []
    for i, step in enumerate(ROADMAP):
        with torch.device("meta"):
            model = create_model(step_model_name(i))
        rows.append(RoadmapRow(i, step_model_name(i), step.change, sum(p.numel() for p in model.parameters()) / 1e6,
                               count_macs(model, img_size) / 1e9, step.gflops, step.top1, step.source, step.group))
    return rows


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_roadmap(rows: list[RoadmapRow], img_size: int = 224) -> str:
    """A plain-text table; the paper's columns are blank where we did not transcribe a figure."""
    head = (f"{'#':>2}  {'model':<27} {'change':<54} {'params(M)':>9} {f'GMACs@{img_size}':>10} "
            f"{'paper GFLOPs':>12} {'paper top-1':>11}  source")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.index:>2}  {r.model:<27} {r.change:<54} {r.params_m:>9.2f} {r.gmacs:>10.3f} "
                     f"{_num(r.paper_gflops, '.1f'):>12} {_num(r.paper_top1, '.1f'):>11}  {r.source}")
    lines.append("paper: Liu et al., \"A ConvNet for the 2020s\", CVPR 2022, Section 2 and Figure 2 (ImageNet-1K, 224², "
                 "300 epochs); blank: figure not transcribed (read off the chart only).")
    return "\n".join(lines)


def plot_roadmap(rows: list[RoadmapRow], out: str | Path, measured: dict[int, list[float]] | None = None,
                 measured_label: str = "ours") -> Path:
    """Figure 2's chart: one horizontal bar per step, top to bottom, at the paper's ImageNet top-1, coloured by
    design group, with GFLOPs (paper / measured) beside it and Swin-T's accuracy as a dashed line.
    ``measured``: step index -> accuracies (one per seed) to plot as a second panel (mean ± std)."""
    plt = pyplot()
    n = len(rows)
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 0.42 * n + 1.6), sharey=True, squeeze=False)
    ax = axes[0][0]
    y = list(range(n))[::-1]
    for r, yy in zip(rows, y):
        if r.paper_top1 is not None:
            ax.barh(yy, r.paper_top1 - 77.0, left=77.0, color=_COLORS.get(r.group, "#cccccc"), edgecolor="black",
                    linewidth=0.5, height=0.7)
            ax.text(r.paper_top1 + 0.05, yy, f"{r.paper_top1:.1f}", va="center", fontsize=8)
        else:
            ax.text(77.1, yy, "(accuracy not transcribed)", va="center", fontsize=7, color="gray")
        flops = f"{r.paper_gflops:.1f}G" if r.paper_gflops is not None else "  -  "
        ax.text(83.3, yy, f"{flops} / {r.gmacs:.2f}G", va="center", fontsize=8, family="monospace")
    ax.axvline(SWIN_T["top1"], color="black", linestyle="--", linewidth=0.8)
    ax.text(SWIN_T["top1"] + 0.05, -0.75, f"Swin-T {SWIN_T['top1']} ({SWIN_T['gflops']}G)", fontsize=7)
    ax.set_ylim(-1.0, n - 0.4)
    ax.set_yticks(y)
    ax.set_yticklabels([r.change.replace("ResNeXt-ify: ", "") for r in rows], fontsize=8)
    ax.set_xlim(77.0, 85.2)
    ax.set_xticks([78, 79, 80, 81, 82])
    ax.set_xlabel("ImageNet-1K top-1 (%), paper")
    ax.set_title("ConvNeXt roadmap (paper, Fig. 2)   GFLOPs: paper / ours", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, list(_COLORS), fontsize=7, loc="lower center", ncol=len(_COLORS), frameon=False)
    if measured:
        ax2 = axes[0][1]
        for r, yy in zip(rows, y):
            accs = measured.get(r.index)
            if not accs:
                continue
            mean = statistics.fmean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ax2.barh(yy, mean, xerr=std, color=_COLORS.get(r.group, "#cccccc"), edgecolor="black", linewidth=0.5,
                     height=0.7, capsize=2)
            ax2.text(mean, yy, f" {mean:.2f}" + (f"±{std:.2f}" if len(accs) > 1 else ""), va="center", fontsize=7)
        ax2.set_xlabel(f"test top-1 (%), {measured_label}")
        accs = [a for v in measured.values() for a in v]
        if accs:
            ax2.set_xlim(max(0.0, min(accs) - 5.0), min(100.0, max(accs) + 3.0))
    return save(fig, out, dpi=120, bottom=0.3 / fig.get_figheight())  # room for the legend


def write_roadmap(out: str | Path | None = "roadmap.png", img_size: int = 224) -> str:
    """What ``maskconv roadmap`` does: the table as text, and (``out`` not None) the chart written to ``out``."""
    rows = roadmap_table(img_size)
    text = format_roadmap(rows, img_size)
    if out is not None:
        text += f"\nwrote {plot_roadmap(rows, out)}"
    return text


def _arguments(p) -> None:
    p.add_argument("--out", default="roadmap.png", help="PNG of the paper's Figure-2 chart to write")
    p.add_argument("--img-size", type=int, default=224)


def _cli(args) -> None:
    print(write_roadmap(args.out, args.img_size))


COMMAND = Command("ConvNeXt paper's ResNet-50 -> ConvNeXt-T steps: params, GMACs, paper figures", _arguments, _cli)
