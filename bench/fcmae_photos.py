"""A short real FCMAE pretraining run on scikit-image's bundled photos (no download), then a reconstruction
picture of held-out crops. Proves the objective learns on real pixels; not a quality benchmark.

    .venv/bin/python bench/fcmae_photos.py --steps 250 --out bench_out --png docs/fcmae_recon_photos.png
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maskconv.data import IMAGENET_MEAN, IMAGENET_STD, PhotoCrops
from maskconv.pretrain import create_objective, save_objective
from maskconv.viz.reconstruction import plot_reconstruction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--patch-size", type=int, default=2, help="stem stride; 2 gives 16-px FCMAE patches")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--png", default="docs/fcmae_recon_photos.png")
    args = p.parse_args()
    torch.manual_seed(0)
    obj = create_objective("fcmae", model=args.model, model_kwargs=dict(patch_size=args.patch_size),
                           decoder_dim=256, mask_ratio=0.6)
    data = DataLoader(PhotoCrops(size=args.size, length=args.steps * args.batch), batch_size=args.batch,
                      num_workers=0, drop_last=True)
    opt = torch.optim.AdamW(obj.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm))))
    log, t0 = [], time.perf_counter()
    obj.train()
    for step, x in enumerate(data):
        loss = obj(x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_objective(obj, out / "fcmae_photos.safetensors")
    (out / "fcmae_photos_loss.json").write_text(json.dumps(log))
    torch.manual_seed(123)  # held-out crops: other crops than any seen in training (new RNG stream)
    held = torch.stack([PhotoCrops(size=args.size, length=6)[i] for i in range(6)])
    png = plot_reconstruction(obj, held, args.png, IMAGENET_MEAN, IMAGENET_STD,
                              title=f"FCMAE {args.model} (patch {obj.patch_size}px), {args.steps} steps on "
                                    f"bundled photos: first-25 loss {sum(log[:25]) / 25:.3f} -> last-25 "
                                    f"{sum(log[-25:]) / 25:.3f}")
    print(f"checkpoint: {ckpt}\npicture: {png}")


if __name__ == "__main__":
    main()
