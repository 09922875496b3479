"""Images/s read from WebDataset tar shards vs the image folder they were written from, on the same images.

Two sets, written once into a temporary folder: (a) the first ``--small`` Fashion-MNIST training images as
28x28 PNGs in class folders (file open / stat cost dominates); (b) the scikit-image photos re-encoded as
~1.5 MP JPEGs (decoding dominates), repeated to ``--large`` files. Each is written as shards
(``maskconv.data.shards.write_shards``), then read by the engine's path: ``build_dataset`` (decode, JPEG
reduce-on-decode for ``--img-size``) in one epoch's ``ResumableSampler`` order (a random permutation), in the
main process. Rounds alternate folder / shards; the median images/s of each and their ratio are printed
(> 1: shards faster). The page cache is warm for both (every file was just written): this measures the per-file
system-call and decode cost, not a cold disk or a network file system, where shards gain more.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shards_vs_folder.py [--small 4000 --large 48 --rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _fashion_pngs(root: Path, n: int) -> None:
    from PIL import Image

    from maskconv.data.datasets import FashionMNIST

    ds = FashionMNIST(train=True, in_chans=1)
    for i in range(n):
        img, label = ds[i]
        d = root / f"{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(d / f"{i:06d}.png")


def _photo_jpegs(root: Path, n: int) -> None:
    from PIL import Image

    from maskconv.data.photos import bundled_photos

    root.mkdir(parents=True)
    photos = list(bundled_photos().values())
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)])
        s = (1.5e6 / (im.width * im.height)) ** 0.5  # ~1.5 megapixels
        im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)


def _read_all(ds, order) -> float:
    t = time.perf_counter()
    for i in order:
        item = ds[i]
        assert not hasattr(item, "reason"), item  # every image must decode
    return len(order) / (time.perf_counter() - t)


def _bench(name: str, folder: Path, shards: Path, in_chans: int, img_size: int, rounds: int) -> None:
    from maskconv.config import DataCfg
    from maskconv.data.build import build_dataset
    from maskconv.data.datasets import ResumableSampler

    t = time.perf_counter()
    ds_f = build_dataset(DataCfg(path=str(folder), img_size=img_size), in_chans, labeled=False)
    t_f = time.perf_counter() - t
    t = time.perf_counter()
    ds_s = build_dataset(DataCfg(path=f"shards:{shards}", img_size=img_size), in_chans, labeled=False)
    t_s = time.perf_counter() - t
    assert len(ds_f) == len(ds_s)
    order = [i for i, _ in ResumableSampler(len(ds_f), 1, seed=0, epoch=0)]
    rates = {"folder": [], "shards": []}
    for r in range(rounds):
        pairs = [("folder", ds_f), ("shards", ds_s)]
        for kind, ds in pairs if r % 2 == 0 else pairs[::-1]:
            rates[kind].append(_read_all(ds, order))
    f, s = statistics.median(rates["folder"]), statistics.median(rates["shards"])
    print(f"| {name} | {len(ds_f)} | {t_f * 1e3:.0f} / {t_s * 1e3:.0f} | {f:.0f} | {s:.0f} | **{s / f:.2f}x** |",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=4000, help="Fashion-MNIST PNGs (28x28)")
    p.add_argument("--large", type=int, default=48, help="~1.5 MP JPEGs (scikit-image photos re-encoded)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    from maskconv.data.shards import write_shards

    print("| images | n | listing ms (folder / shards) | folder img/s | shards img/s | shards vs folder |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("Fashion-MNIST 28x28 PNG", tmp / "fm", _fashion_pngs, args.small, 1, 28),
                 ("photos ~1.5 MP JPEG (img_size 224)", tmp / "ph", _photo_jpegs, args.large, 3, 224)]
        for name, folder, make, n, in_chans, size in cases:
            make(folder, n)
            t = time.perf_counter()
            write_shards(folder, folder.with_name(folder.name + "_shards"), shard_size=1000)
            print(f"<!-- {name}: shards written in {time.perf_counter() - t:.1f} s -->", flush=True)
            _bench(name, folder, folder.with_name(folder.name + "_shards"), in_chans, size, args.rounds)


if __name__ == "__main__":
    main()
