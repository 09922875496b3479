"""Photos bundled with scikit-image (no download), as a dataset of random crops: the demo's default data."""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Shipped inside the scikit-image wheel (others are fetched from the network, which we never do).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "brick", "grass", "gravel", "camera", "coins", "moon", "cell")


def bundled_photos() -> dict[str, np.ndarray]:
    """``{name: (H, W, 3) uint8}`` of scikit-image's bundled photos; grayscale ones repeated to RGB."""
    try:
        import skimage.data as sd
    except ImportError as e:
        raise ImportError("the bundled photos come from scikit-image: pip install 'maskconv[viz]'") from e
    out = {}
    for name in _PHOTOS:
        try:
            im = np.asarray(getattr(sd, name)())
        except Exception:  # a photo missing from this scikit-image build: use the others
            continue
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out[name] = im[..., :3].astype(np.uint8)
    if not out:
        raise RuntimeError("no bundled scikit-image photo could be loaded")
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def default_norm(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for RGB, (0.5, 0.5) per channel otherwise."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def load_images(source, size: int, in_chans: int = 3, limit: int = 8) -> torch.Tensor:
    """Up to ``limit`` images from a file or a folder (recursive, sorted), resized (shorter side) and
    center-cropped to ``size``, normalised with ``default_norm`` -> (B, in_chans, size, size)."""
    from pathlib import Path

    from PIL import Image
    from torchvision.transforms import v2

    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif src.is_file():
        files = [src]
    else:
        raise FileNotFoundError(f"no such image file or folder: {src}")
    mean, std = default_norm(in_chans)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    out, bad = [], []
    for f in files:
        if len(out) == limit:
            break
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if in_chans == 3 else "L")
                t = tf(im)
        except Exception:
            bad.append(f.name)
            continue
        out.append(t.repeat(in_chans, 1, 1) if in_chans not in (1, 3) else t)
    if not out:
        raise ValueError(f"no readable image in {src}" + (f" (unreadable: {', '.join(bad[:5])})" if bad else ""))
    return torch.stack(out)
