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


def load_images(source, size: int, in_chans: int = 3, limit: int = 8, max_pixels: int | None = None) -> torch.Tensor:
    """Up to ``limit`` images from a file or a folder (recursive, sorted, regular files only), read exactly as
    training reads them: ``decode_image`` (modes, 16-bit, pixel limit, JPEG reduce-on-decode) and the validation
    transform of ``build_transform`` at ``size`` -> (B, in_chans, size, size), normalised with ``default_norm``.
    Unreadable files are skipped and named on stderr; none readable is a ValueError."""
    import sys
    from pathlib import Path

    from ..config import DataCfg
    from .build import build_transform
    from .datasets import decode_image, decode_min_side, describe_unreadable, list_image_files, unreadable_reason

    cfg = DataCfg(path=str(source), img_size=size)
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    src = Path(source)
    if src.is_dir():
        files, skipped = list_image_files(src)
        bad = {u.path: u.reason for u in skipped}
    elif src.exists():
        files, bad = [src], {}
    else:
        raise FileNotFoundError(f"no such image file or folder: {src}")
    tf = build_transform(cfg, in_chans, train=False)
    out = []
    for f in files:
        if len(out) == limit:
            break
        try:
            out.append(tf(decode_image(f, in_chans, max_pixels, decode_min_side(size))))
        except Exception as e:
            bad[str(f)] = unreadable_reason(e)
    if not out:
        raise ValueError(f"no readable image in {src}" + (f" ({describe_unreadable(bad)})" if bad else ""))
    if bad:
        print(f"{describe_unreadable(bad)}", file=sys.stderr)
    return torch.stack(out)
