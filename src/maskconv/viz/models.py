"""Model-zoo figure: size against compute, and measured CPU throughput against compute, one point per model."""
from __future__ import annotations

from pathlib import Path

from ._plot import pyplot, save

# V1 and V2 of one size have nearly the same params and GMACs (V2 adds GRN's 2C per block), so the points
# coincide: V1 is a large open circle, V2 a small filled square inside it, and a size is labelled once.
STYLE = {"convnext_": dict(marker="o", s=90, facecolors="none", edgecolors="tab:blue", linewidths=1.5),
         "convnextv2_": dict(marker="s", s=22, color="tab:orange")}


def plot_model_table(rows, path: str | Path, img_size: int = 224, machine: str | None = None) -> Path:
    """``rows``: ``api.ModelRow`` s. ``machine`` describes where throughput was measured (printed in the title:
    a loaded machine gives lower, noisier numbers)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.0))
    labelled = set()
    for fam, style in STYLE.items():
        sel = [r for r in rows if r.name.startswith(fam)]
        name = fam.rstrip("_")
        a.scatter([r.params_m for r in sel], [r.gmacs for r in sel], label=name, zorder=3, **style)
        for r in sel:
            size = r.name.split("_", 1)[1]
            if size not in labelled:
                labelled.add(size)
                a.annotate(size, (r.params_m, r.gmacs), fontsize=7, xytext=(5, -9), textcoords="offset points")
        meas = [r for r in sel if r.img_per_s]
        b.scatter([r.gmacs for r in meas], [r.img_per_s for r in meas], label=name, zorder=3, **style)
        for r in meas:
            b.annotate(f"{'v2 ' if fam == 'convnextv2_' else ''}{r.name.split('_', 1)[1]}", (r.gmacs, r.img_per_s),
                       fontsize=7, xytext=(5, 3 if fam == "convnextv2_" else -9), textcoords="offset points")
    a.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel=f"GMACs @{img_size}",
          title="size and compute (V1 and V2 of a size nearly coincide)")
    where = machine or "this machine"
    b.set(xscale="log", yscale="log", xlabel=f"GMACs @{img_size}", ylabel="images / s (CPU inference)",
          title=f"CPU throughput, measured once on\n{where}\n(other load on the machine lowers it)")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return save(fig, path, dpi=110)
