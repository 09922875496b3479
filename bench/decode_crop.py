"""Pretraining input per CPU core: decode a real-size JPEG + RandomResizedCrop(224) + flip + normalize, three ways.

* ``pil_full``   — what timm and the official repos do: PIL decodes every pixel, the crop runs on the PIL image.
* ``pil_draft``  — ours (``data.datasets.decode_image`` with ``decode_min_side``): PIL ``draft`` lets the JPEG
  DCT decode at 1/2, 1/4 or 1/8 scale while the shorter side stays large enough that the smallest crop
  (``crop_scale_min`` of the area) is never upsampled; then uint8 tensor transforms (torchvision v2).
* ``tv_decode``  — ``torchvision.io.decode_jpeg`` (libjpeg-turbo, full size) to a uint8 tensor, then the same v2
  transforms.

The JPEGs: scikit-image's bundled photos upscaled to 1, 2 and 4 MP and re-encoded (quality 90) in a temporary
folder. One thread (``torch.set_num_threads(1)``), rounds interleave the pipelines, medians of images/s.

    OMP_NUM_THREADS=1 python bench/decode_crop.py [--rounds 3 --images 24]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from maskconv.data.datasets import decode_image, decode_min_side
from maskconv.data.photos import IMAGENET_MEAN, IMAGENET_STD, bundled_photos

SIZE, SCALE = 224, (0.2, 1.0)


def make_jpegs(folder: Path, n: int) -> list[Path]:
    photos = [p for p in bundled_photos().values() if min(p.shape[:2]) >= 256]
    out = []
    for i in range(n):
        mp = (1, 2, 4)[i % 3]
        src = Image.fromarray(photos[i % len(photos)])
        w, h = src.size
        k = (mp * 1e6 / (w * h)) ** 0.5
        path = folder / f"{i:03d}_{mp}mp.jpg"
        src.resize((round(w * k), round(h * k)), Image.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


def pipelines():
    rrc = dict(scale=SCALE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    tail = [v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    on_pil = v2.Compose([v2.RandomResizedCrop(SIZE, **rrc), *tail])  # crop on the PIL image (timm-style)
    on_u8 = v2.Compose([v2.RandomResizedCrop(SIZE, **rrc), *tail])  # crop on the uint8 tensor
    min_side = decode_min_side(SIZE, SCALE[0])

    def pil_full(p):
        with Image.open(p) as im:
            return on_pil(im.convert("RGB"))

    def pil_draft(p):
        return on_u8(decode_image(p, 3, min_side=min_side))

    def tv_decode(p):
        from torchvision.io import decode_jpeg, read_file

        return on_u8(decode_jpeg(read_file(str(p))))

    return {"pil_full": pil_full, "pil_draft": pil_draft, "tv_decode": tv_decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipes = pipelines()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), a.images)
        sizes = [Image.open(f).size for f in files]
        full = sum(w * h for w, h in sizes)
        drafted = sum(decode_image(f, 3, min_side=decode_min_side(SIZE, SCALE[0])).shape[1:].numel() for f in files)
        print(f"{len(files)} JPEGs, {min(w * h for w, h in sizes) / 1e6:.1f}-{max(w * h for w, h in sizes) / 1e6:.1f}"
              f" MP; RandomResizedCrop({SIZE}, scale={SCALE}) + flip + normalize; 1 thread; {a.rounds} rounds")
        for f in pipes.values():  # warm-up, and every pipeline gives the same output shape
            assert f(files[0]).shape == (3, SIZE, SIZE)
        rates = {k: [] for k in pipes}
        for r in range(a.rounds):
            order = list(pipes) if r % 2 == 0 else list(reversed(pipes))
            for k in order:
                torch.manual_seed(r)
                t0 = time.perf_counter()
                for f in files:
                    pipes[k](f)
                rates[k].append(len(files) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("| pipeline | images/s per core | vs pil_full |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | **{v / med['pil_full']:.2f}x** |")
    ms = decode_min_side(SIZE, SCALE[0])
    print(f"pil_draft (min side {ms} px) decoded {100 * drafted / full:.0f}% of the pixels a full decode gives")

if __name__ == "__main__":
    main()
