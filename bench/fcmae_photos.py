"""A short real FCMAE pretraining run on scikit-image's bundled photos (no download), then a reconstruction
picture of held-out crops. Proves the objective learns on real pixels; not a quality benchmark.

    .venv/bin/python bench/fcmae_photos.py --steps 250 --out bench_out --png docs/fcmae_recon_photos.png
"""
import argparse

from maskconv.api import run_photo_pretrain

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--patch-size", type=int, default=2, help="stem stride; 2 gives 16-px FCMAE patches")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--png", default="docs/fcmae_recon_photos.png")
    a = p.parse_args()
    res = run_photo_pretrain(a.model, a.patch_size, a.size, a.batch, a.steps, a.lr, out=a.out, png=a.png)
    print(f"checkpoint: {res['checkpoint']}\npicture: {res['picture']}")
