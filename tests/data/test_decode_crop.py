"""The fast decode path draws the same training crops as the reference path.

Fast (ours): a JPEG decoded at 1/2^k scale by PIL ``draft`` (``decode_image`` with ``decode_min_side``), then the
training transform's RandomResizedCrop on that reduced image. Reference (timm / the official repos): every pixel
decoded, the same RandomResizedCrop on the full image. The crop is drawn relative to the image it sees, so:

* the same RNG draw gives the same crop *size* in full-image pixels, up to the rounding of a 2^k-times smaller
  image: ``w = round(sqrt(area * scale * ratio))`` on each, so ``|2^k w_fast - w_ref| <= 2^k / 2 + 1/2``, i.e.
  ``<= 2^(k-1)`` pixels (both integers); the same for the height;
* the crop *position* is not paired: ``torch.randint(0, n)`` maps one random word to ``word mod n`` and ``n``
  (the free room, ``H - h + 1``) differs by about 2^k, so it is tested as a distribution: over independent draws
  the crop centre, area fraction and aspect ratio of the two paths agree by a two-sample Kolmogorov-Smirnov test,
  and the same test rejects a fast path with a wrong scale range or a biased position.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from maskconv.config import DataCfg
from maskconv.data.build import build_transform
from maskconv.data.datasets import decode_image, decode_min_side

W, H, K = 1024, 768, 2  # multiples of 8: the draft reduction divides exactly; 1/4 is the scale chosen below
N = 3000  # draws per path for the distribution tests
KS_CRIT = 1.949 * math.sqrt(2 / N)  # two-sample KS critical value at alpha = 0.001 (asymptotic), ~0.050


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(full decode, draft-reduced decode, the training RandomResizedCrop) of one real-size JPEG."""
    path = tmp_path_factory.mktemp("jpeg") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path, quality=90)
    cfg = DataCfg(path="unused", img_size=64, crop_scale_min=0.2)
    full = decode_image(path, 3)
    fast = decode_image(path, 3, min_side=decode_min_side(cfg.img_size, cfg.crop_scale_min))  # 144 px
    assert full.shape == (3, H, W) and fast.shape == (3, H >> K, W >> K)  # 1/8 (96 px) would undercut 144
    rrc = build_transform(cfg, 3, train=True).transforms[0]
    assert isinstance(rrc, v2.RandomResizedCrop) and rrc.scale == (0.2, 1.0)
    return full, fast, rrc


def _box(rrc, img, seed: int) -> tuple[tuple[float, float, float, float], torch.Tensor]:
    """The crop (top, left, height, width) in full-image pixels for the RNG seeded with ``seed``, and the RNG
    state after the draw (equal states: both paths took the same number of attempts)."""
    torch.default_generator.manual_seed(seed)  # the CPU generator the crop draws from (SeededDataset seeds it)
    p = rrc.make_params([img])
    sy, sx = H / img.shape[1], W / img.shape[2]
    return (p["top"] * sy, p["left"] * sx, p["height"] * sy, p["width"] * sx), torch.get_rng_state()


def _stats(boxes) -> dict[str, np.ndarray]:
    b = np.array(boxes)  # (n, 4): top, left, height, width in full-image pixels
    return {"area": b[:, 2] * b[:, 3] / (H * W), "log_aspect": np.log(b[:, 3] / b[:, 2]),
            "centre_y": (b[:, 0] + b[:, 2] / 2) / H, "centre_x": (b[:, 1] + b[:, 3] / 2) / W}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(np.sort(a), x, side="right") / len(a)
                        - np.searchsorted(np.sort(b), x, side="right") / len(b)).max())


def test_same_draw_gives_the_same_crop_size(images):
    full, fast, rrc = images
    tol = 2 ** (K - 1)  # pixels of the full image (module docstring)
    paired = 0
    for seed in range(1000):
        (_, _, h_ref, w_ref), after_ref = _box(rrc, full, seed)
        (_, _, h_fast, w_fast), after_fast = _box(rrc, fast, seed)
        if not torch.equal(after_ref, after_fast):
            # a draw within ~2^k px of the image edge was accepted by one path and redrawn by the other
            continue
        paired += 1
        assert abs(h_fast - h_ref) <= tol and abs(w_fast - w_ref) <= tol, (seed, h_ref, w_ref, h_fast, w_fast)
    assert paired >= 990  # the edge cases are rare


@pytest.fixture(scope="module")
def reference(images):
    """Crop statistics of the reference path over N draws (seeds 0..N-1)."""
    full, _, rrc = images
    return _stats([_box(rrc, full, s)[0] for s in range(N)])


def test_crop_distribution_matches_the_full_decode(images, reference):
    _, fast, rrc = images
    ref = reference
    got = _stats([_box(rrc, fast, s)[0] for s in range(N, 2 * N)])  # independent draws
    for k in ref:
        assert _ks(ref[k], got[k]) < KS_CRIT, k


def test_the_distribution_test_catches_a_wrong_fast_path(images, reference):
    """What the test above would see if the fast path cropped a different scale range or off-centre."""
    _, fast, rrc = images
    ref = reference
    narrow = v2.RandomResizedCrop(rrc.size, scale=(0.3, 1.0))  # e.g. crop_scale_min not passed through
    assert _ks(ref["area"], _stats([_box(narrow, fast, s)[0] for s in range(N, 2 * N)])["area"]) > KS_CRIT
    top = [(0.0, *b[1:]) for b in (_box(rrc, fast, s)[0] for s in range(N, 2 * N))]  # always at the top edge
    assert _ks(ref["centre_y"], _stats(top)["centre_y"]) > KS_CRIT

