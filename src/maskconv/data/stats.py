"""Per-channel mean / std of a data set's pixels (``maskconv data stats``), for ``data.mean`` / ``data.std``.

Computed on the decoded images at their own size, before any augmentation, on the scale the transforms'
``ToDtype(scale=True)`` gives (8-bit / 255, 16-bit / 65535), over every pixel (a large image weighs more), in
float64 sums: ``std = sqrt(E[x^2] - E[x]^2)``, the population std torchvision's ``Normalize`` expects.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from ..commands import Command
from .datasets import Unreadable


def _scale(img: torch.Tensor) -> float:
    return 65535.0 if img.dtype == torch.uint16 else 255.0 if img.dtype == torch.uint8 else 1.0


def channel_stats(ds: Dataset, limit: int = 0, num_workers: int = 0) -> dict:
    """``{mean, std, images, pixels, unreadable}`` over ``ds`` (its first ``limit`` images when > 0); an
    unreadable file is counted and left out. Raises when no image could be read."""
    n = min(len(ds), limit) if limit > 0 else len(ds)
    loader = DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=None, num_workers=num_workers)
    s = s2 = None
    pixels, images, bad = 0, 0, []
    for item in loader:
        if item is None or isinstance(item, Unreadable):
            bad.append(item)
            continue
        img = item[0]
        x = img.to(torch.float64).flatten(1) / _scale(img)  # (C, H*W)
        s = x.sum(1) if s is None else s + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        pixels += x.shape[1]
        images += 1
    if not images:
        raise ValueError(f"no readable image among the {n} of the data set")
    mean = s / pixels
    var = (s2 / pixels - mean * mean).clamp_min(0)
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(math.sqrt(float(v)), 6) for v in var],
            "images": images, "pixels": pixels, "unreadable": len(bad)}


def data_stats(path: str, in_chans: int = 3, limit: int = 0, num_workers: int = 0) -> dict:
    """``channel_stats`` of the training images of any source ``data.path`` names (folder, ``shards:``, ``hf:``,
    a named set), unlabeled (every image file; a ``val_fraction`` hold-out is not applied), plus the
    ``data.mean=... data.std=...`` overrides that use them."""
    from .build import build_dataset
    from ..config import DataCfg

    st = channel_stats(build_dataset(DataCfg(path=path), in_chans, "train", labeled=False), limit, num_workers)
    st["overrides"] = (f"data.mean={','.join(f'{m:.4f}' for m in st['mean'])} "
                       f"data.std={','.join(f'{s:.4f}' for s in st['std'])}")
    return st


def _arguments(p) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stats", help="per-channel mean / std of a data set's pixels (for data.mean / data.std)")
    s.add_argument("--data", required=True, help="image folder, shards:<folder>, hf:<folder>, or a named data set")
    s.add_argument("--in-chans", type=int, default=3, help="channels the model takes (1: 16-bit gray kept)")
    s.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    s.add_argument("--json", action="store_true", help="print the result as JSON")


def _cli(args) -> None:
    import json

    st = data_stats(args.data, args.in_chans, args.limit, args.num_workers)
    if args.json:
        print(json.dumps(st))
        return
    bad = f" ({st['unreadable']} unreadable file(s) left out)" if st["unreadable"] else ""
    print(f"{st['images']} images, {st['pixels']} pixels{bad}\nmean {st['mean']}\nstd  {st['std']}\n"
          f"use: {st['overrides']}")


COMMAND = Command("data set tools: `data stats` prints the per-channel mean / std for data.mean / data.std",
                  _arguments, _cli)
