"""Pictures of dense predictions: instances (boxes, masks, class, score) and class maps, tiled into one PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["draw_instances", "draw_semantic", "palette"]

TILE = 256


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, far apart for neighbouring ids (golden-ratio hues); id 0 (background) black."""
    import colorsys

    cols = [(0, 0, 0)] + [tuple(int(255 * v) for v in colorsys.hsv_to_rgb((k * 0.618034) % 1, 0.85, 1.0))
                          for k in range(1, max(n, 1))]
    return np.array(cols[:max(n, 1)], dtype=np.uint8)


def _rgb(raw: torch.Tensor) -> np.ndarray:  # uint8 (C, H, W) -> (H, W, 3)
    a = raw.permute(1, 2, 0).numpy()
    return np.repeat(a[..., :1], 3, 2) if a.shape[2] == 1 else a[..., :3].copy()


def _sheet(tiles: list, path: Path) -> None:
    from PIL import Image

    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (TILE + 4), rows * (TILE + 4)), (255, 255, 255))
    for i, im in enumerate(tiles):
        sheet.paste(im, ((i % cols) * (TILE + 4) + 2, (i // cols) * (TILE + 4) + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _scaled(a: np.ndarray):
    from PIL import Image

    im = Image.fromarray(a)
    k = TILE / max(im.size)
    return im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.NEAREST), k


def draw_instances(items: list, names: list[str], path: Path, max_images: int = 16, alpha: float = 0.45) -> None:
    """``items``: (uint8 image (C, H, W), {"boxes" xyxy, "labels" 1..K, "scores", ["masks" (N, 1, H, W)]})."""
    from PIL import ImageDraw

    cols = palette(len(names) + 1)
    tiles = []
    for raw, det in items[:max_images]:
        a = _rgb(raw).astype(np.float32)
        for m, c in zip(det.get("masks", [])[: len(det["labels"])], det["labels"].tolist()):
            on = m.reshape(a.shape[:2]).numpy() > 0.5
            a[on] = (1 - alpha) * a[on] + alpha * cols[c]
        im, k = _scaled(a.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for (x0, y0, x1, y1), c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            color = tuple(int(v) for v in cols[c])
            d.rectangle([x0 * k, y0 * k, x1 * k, y1 * k], outline=color, width=2)
            d.text((x0 * k + 2, max(0, y0 * k - 11)), f"{names[c - 1]} {s:.2f}", fill=color)
        tiles.append(im)
    _sheet(tiles, path)


def draw_semantic(items: list, names: list[str], path: Path, max_images: int = 16, alpha: float = 0.5) -> None:
    """``items``: (uint8 image (C, H, W), class map (H, W)); each class present is named once, at the centre of
    mass of its pixels (two objects of one class: between them)."""
    from PIL import ImageDraw

    cols = palette(len(names))
    tiles = []
    for raw, pred in items[:max_images]:
        p = pred.numpy()
        a = _rgb(raw).astype(np.float32)
        fg = p > 0
        a[fg] = (1 - alpha) * a[fg] + alpha * cols[p[fg]]
        im, k = _scaled(a.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for c in np.unique(p[fg]):
            ys, xs = np.nonzero(p == c)
            d.text((xs.mean() * k, ys.mean() * k), names[c], fill=(255, 255, 255))
        tiles.append(im)
    _sheet(tiles, path)
