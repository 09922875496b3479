"""ERF picture of the issue: ConvNeXt V2 (7x7 kernels) vs SLaK (51x51 as 51x5 + 5x51 + 5x5), RepLKNet's method.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/erf_convnextv2_vs_slak.py --size 384 --num-images 4 \
        --out docs/erf_convnextv2_vs_slak.png

No ImageNet checkpoint is available here, so the weights are random (seed 0); pass --checkpoint A B C to use
trained weights (one per panel, in panel order, 'none' to keep random). SLaK inherits ConvNeXt V1's layer scale
1e-6, which at random init mutes every block (the ERF is then only the stem and downsampling convs), so a third
panel shows slak_tiny built without layer scale (as ConvNeXt V2 is): the reach of the large kernels themselves.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maskconv import create_model, load_checkpoint
from maskconv.tasks.visualize import sample_images
from maskconv.viz.erf import erf_map, high_contribution_area, plot_erf

PANELS = (  # (label, model, build kwargs)
    ("convnextv2_tiny (7x7)", "convnextv2_tiny", {}),
    ("slak_tiny (51x51, as built: layer scale 1e-6)", "slak_tiny", {}),
    ("slak_tiny (51x51, no layer scale)", "slak_tiny", {"ls_init_value": None}),
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--images", default="photos")
    p.add_argument("--checkpoint", nargs="+", default=None)
    p.add_argument("--out", default="docs/erf_convnextv2_vs_slak.png")
    a = p.parse_args()
    ckpts = a.checkpoint or ["none"] * len(PANELS)
    if len(ckpts) != len(PANELS):  # zip would silently drop panels
        p.error(f"--checkpoint: give {len(PANELS)} (one per panel, in order; 'none' keeps random init), "
                f"got {len(ckpts)}")
    x = sample_images(a.images, a.size, 3, a.num_images)
    maps, results = {}, {}
    for (label, name, kw), ckpt in zip(PANELS, ckpts):
        torch.manual_seed(0)
        model = create_model(name, num_classes=0, **kw)
        if ckpt != "none":
            load_checkpoint(model, ckpt)
        label += "" if ckpt == "none" else f" [{Path(ckpt).name}]"
        t0 = time.perf_counter()
        maps[label] = erf_map(model, x, batch_size=1)
        results[label] = high_contribution_area(maps[label])
        rows = ", ".join(f"t={r['t']:g}: side {r['side']} area {r['area_ratio']:.4f}" for r in results[label])
        print(f"{label}: {rows} ({time.perf_counter() - t0:.0f} s)", flush=True)
    weights = "random-init weights (seed 0)" if all(c == "none" for c in ckpts) else "weights as labelled"
    out = Path(a.out)
    plot_erf(maps, out, results, title=f"effective receptive field, {weights}: {len(x)} bundled photos at {a.size}px "
                                       "(% = smallest centred square holding t of the log-ERF)")
    out.with_suffix(".json").write_text(json.dumps(dict(size=a.size, images=len(x), weights=weights,
                                                        ratios=results), indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
