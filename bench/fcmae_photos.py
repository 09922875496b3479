"""A short real FCMAE pretraining run (through the engine) on scikit-image's bundled photos (no download),
then reconstructions of held-out whole photos and the training curves. Proves the objective learns on real
pixels; not a quality benchmark.

    .venv/bin/python bench/fcmae_photos.py --out docs/fcmae_photos [key=value ...]
"""
import argparse

from maskconv.tasks.demo import run_pretrain_demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/fcmae_photos")
    p.add_argument("overrides", nargs="*", help="config overrides of the demo_photos recipe")
    a = p.parse_args()
    for k, v in run_pretrain_demo(a.out, data="photos", overrides=a.overrides).items():
        print(f"{k}: {v}")
