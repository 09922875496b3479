"""Model-zoo figure: measured CPU throughput against compute, one point per model."""
from __future__ import annotations

from pathlib import Path

from ._plot import pyplot, save


def plot_model_table(rows, path: str | Path, img_size: int = 224) -> Path:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for fam, marker in (("convnext_", "o"), ("convnextv2_", "s")):
        sel = [r for r in rows if r.name.startswith(fam)]
        a.scatter([r.params_m for r in sel], [r.gmacs for r in sel], marker=marker, label=fam.rstrip("_"))
        for r in sel:
            a.annotate(r.name.split("_", 1)[1], (r.params_m, r.gmacs), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
        meas = [r for r in sel if r.img_per_s]
        b.scatter([r.gmacs for r in meas], [r.img_per_s for r in meas], marker=marker, label=fam.rstrip("_"))
        for r in meas:
            b.annotate(r.name.split("_", 1)[1], (r.gmacs, r.img_per_s), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    a.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel=f"GMACs @{img_size}",
          title="size and compute")
    b.set(xscale="log", yscale="log", xlabel=f"GMACs @{img_size}", ylabel="images / s (CPU inference)",
          title="measured throughput on this machine")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return save(fig, path, dpi=110)
