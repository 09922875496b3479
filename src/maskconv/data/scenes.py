"""The offline detection benchmark: Fashion-MNIST items composed onto canvases, written as COCO JSON.

``make_scenes(out, split, num, seed)`` draws 1-6 items per canvas (train items for ``train``, t10k items for
``val``), each scaled 0.8-1.8x (22-50 px), placed anywhere (crossing the border is allowed) and pasted in order,
so later items occlude earlier ones. Each item's shape is the polygon traced around its pixels (> 25); the item
is drawn *through that polygon's raster* (pycocotools), so the polygon is the ground truth and an oracle is exact.
Per object the JSON holds: the visible region as COCO polygons (several parts when occlusion splits it), its
box (the polygon's extent), area, 4 extremal keypoints of the whole item (top, left, bottom, right; v=2 visible,
1 occluded, 0 outside the canvas), and per image one template caption. A placement that would hide more than
70% (or all but 20 px) of an item, or leave the new item mostly off the canvas, is redrawn.

Byte-identical for (split, num, seed, size, items): scene i draws from ``SeedSequence([seed, i])``. Written once
into ``out`` and reused: asking for other parameters in the same folder is an error, never a silent mix.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..commands import Command
from ..fileio import atomic_write_text

__all__ = ["make_scenes", "SCENE_KEYPOINTS"]

SCENE_KEYPOINTS = ("top", "left", "bottom", "right")
THRESHOLD = 25  # item pixel > 25 belongs to the item (Fashion-MNIST backgrounds are 0 with faint halos)
MIN_VISIBLE_FRAC, MIN_VISIBLE_PX = 0.3, 20
SIMPLIFY_PX = 0.7  # Douglas-Peucker tolerance of the traced polygons
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _deps():
    try:
        from pycocotools import mask as mask_utils
        from skimage import measure
    except ImportError as e:
        raise ImportError(f"maskconv scenes needs pycocotools and scikit-image ({e.name} is missing): "
                          "pip install 'maskconv[detect,viz]'") from None
    return mask_utils, measure


def _trace(mask: np.ndarray, measure) -> list[np.ndarray]:
    """Outlines of a boolean mask as (K, 2) arrays of (x, y) COCO coordinates (pixel (i, j) covers [j, j+1])."""
    padded = np.pad(mask.astype(np.float32), 1)
    parts = []
    for c in measure.find_contours(padded, 0.5):
        c = measure.approximate_polygon(c, SIMPLIFY_PX)
        if len(c) >= 4:  # closed: first == last; a triangle at least
            parts.append(np.stack([c[:-1, 1] - 0.5, c[:-1, 0] - 0.5], 1))  # (row, col) -> (x, y), pad undone
    return parts


def _raster(parts: list[np.ndarray], h: int, w: int, mask_utils) -> np.ndarray:
    if not parts:
        return np.zeros((h, w), bool)
    rles = mask_utils.frPyObjects([p.reshape(-1).astype(np.float64).tolist() for p in parts], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _caption(objs: list[dict], names: list[str], size: int) -> str:
    words = []
    for o in objs:
        x, y, w, h = o["bbox"]
        cy, cx = (y + h / 2) / size, (x + w / 2) / size
        row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
        col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
        where = "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"
        big = "large" if max(w, h) > size * 0.3 else "small"
        words.append(f"a {big} {names[o['category_id'] - 1].lower()} at the {where}")
    n = len(objs)
    body = words[0] if n == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"{_NUMBERS[n] if n < 10 else n} item{'s' if n != 1 else ''}: {body}."


def _scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int, max_items: int,
           min_items: int, mask_utils, measure):
    """One canvas: (image (size, size) uint8, objects as dicts with category_id, parts, amodal polygon)."""
    from PIL import Image

    pad = 64  # items may cross the border: work on a larger canvas, keep the centre
    big = size + 2 * pad
    canvas = np.zeros((big, big), np.uint8)
    placed: list[dict] = []  # each: label, amodal mask (big canvas), polygon (big-canvas coords)
    want = int(rng.integers(min_items, max_items + 1))
    inside = np.zeros((big, big), bool)
    inside[pad:pad + size, pad:pad + size] = True
    for _ in range(want):
        k = int(rng.integers(len(items)))
        side = int(round(28 * rng.uniform(0.8, 1.8)))
        item = np.asarray(Image.fromarray(items[k]).resize((side, side), Image.BILINEAR))
        shape = _trace(item > THRESHOLD, measure)
        if not shape:
            continue
        shape = [max(shape, key=lambda p: len(p))]  # the outline (inner contours are holes of the garment)
        for _try in range(10):
            top, left = (int(v) for v in rng.integers(pad - side // 3, pad + size - 2 * side // 3, size=2))
            poly = [shape[0] + np.array([left, top], np.float64)]
            amodal = _raster(poly, big, big, mask_utils)
            if (amodal & inside).sum() < MIN_VISIBLE_FRAC * amodal.sum():
                continue
            ok = all(((p["visible"] & ~amodal).sum() >= max(MIN_VISIBLE_PX, MIN_VISIBLE_FRAC * p["amodal"].sum()))
                     for p in placed)
            if ok:
                break
        else:
            continue
        tile = np.zeros((big, big), np.uint8)
        tile[top:top + side, left:left + side] = item
        canvas = np.where(amodal, tile, canvas)  # drawn through the polygon: pixels and ground truth agree
        for p in placed:
            p["visible"] &= ~amodal
        placed.append({"label": int(labels[k]) + 1, "amodal": amodal, "poly": poly[0], "visible": amodal & inside})
    image = canvas[pad:pad + size, pad:pad + size].copy()
    objs = []
    for p in placed:
        vis = p["visible"][pad:pad + size, pad:pad + size]
        parts = _trace(vis, measure)
        if not parts:
            continue
        pts = np.concatenate(parts)
        x0, y0 = np.clip(pts.min(0), 0, size)
        x1, y1 = np.clip(pts.max(0), 0, size)
        kps = []
        poly = p["poly"] - pad
        for j, axis, pick in ((0, 1, np.argmin), (1, 0, np.argmin), (2, 1, np.argmax), (3, 0, np.argmax)):
            x, y = poly[pick(poly[:, axis])]
            xi, yi = int(np.floor(x)), int(np.floor(y))
            if not (0 <= x < size and 0 <= y < size):
                kps += [0.0, 0.0, 0]
            else:
                kps += [round(float(x), 2), round(float(y), 2), 2 if vis[min(yi, size - 1), min(xi, size - 1)] else 1]
        seg = [[round(float(v), 2) for v in q.reshape(-1)] for q in parts]
        area = float(_raster([np.asarray(s).reshape(-1, 2) for s in seg], size, size, mask_utils).sum())
        objs.append({"category_id": p["label"], "segmentation": seg, "area": area,
                     "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                              round(float(y1 - y0), 2)],
                     "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v > 0), "iscrowd": 0})
    return image, objs


def make_scenes(out: str | Path, split: str = "train", num: int = 1000, seed: int = 0, size: int = 128,
                min_items: int = 1, max_items: int = 6, root: str | Path | None = None) -> Path:
    """Write (or reuse) ``num`` scenes in ``out`` (``annotations.json`` + ``images/``); returns the JSON path."""
    from PIL import Image

    from .datasets import FASHION_MNIST_CLASSES, FashionMNIST

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    if num < 1 or size < 32 or not 1 <= min_items <= max_items:
        raise ValueError(f"need num >= 1, size >= 32 and 1 <= min_items <= max_items (got {num}, {size}, "
                         f"{min_items}, {max_items})")
    out = Path(out)
    js = out / "annotations.json"
    params = {"split": split, "num": num, "seed": seed, "size": size, "min_items": min_items, "max_items": max_items}
    if js.exists():
        try:
            have = json.loads(js.read_text()).get("info", {}).get("maskconv_scenes")
        except json.JSONDecodeError:
            have = None
        if have == params:
            return js  # generated once, cached
        raise ValueError(f"{js} holds other scenes ({have}); choose another --out for {params}")
    mask_utils, measure = _deps()
    fm = FashionMNIST(train=split == "train", root=root)
    names = list(FASHION_MNIST_CLASSES)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns, captions = [], [], []
    for i in range(num):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        img, objs = _scene(rng, fm.images, fm.labels, size, max_items, min_items, mask_utils, measure)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(img).save(out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for o in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, **o})
        captions.append({"id": i + 1, "image_id": i + 1, "caption": _caption(objs, names, size) if objs else
                         "an empty canvas."})
    cats = [{"id": k + 1, "name": n, "supercategory": "fashion", "keypoints": list(SCENE_KEYPOINTS),
             "skeleton": []} for k, n in enumerate(names)]
    doc = {"info": {"description": "Fashion-MNIST scenes (maskconv)", "maskconv_scenes": params},
           "images": images, "annotations": anns, "categories": cats, "captions": captions}
    atomic_write_text(js, json.dumps(doc))  # whole or absent: an interrupted run never leaves a JSON to be "cached"
    return js


def _arguments(s) -> None:
    s.add_argument("--out", required=True, help="folder for annotations.json + images/ (reused when it exists)")
    s.add_argument("--split", choices=("train", "val"), default="train", help="train or t10k Fashion-MNIST items")
    s.add_argument("--num", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=128, help="canvas side in px")


def _cli(args) -> None:
    print(f"scenes: {make_scenes(args.out, args.split, args.num, args.seed, args.size)}")


COMMAND = Command("write the offline detection benchmark: Fashion-MNIST scenes as COCO JSON", _arguments, _cli)
