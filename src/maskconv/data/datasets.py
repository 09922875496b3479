"""Datasets: image folders (unlabeled, or class sub-folders), Fashion-MNIST from Debian's package, synthetic.

Every dataset returns ``(image uint8 tensor (C, H, W), label)`` (label -1 when unlabeled); transforms are
applied by ``SeededDataset``, which seeds each sample's augmentation from (seed, epoch, index) so a resumed
or distributed run sees exactly the same augmented images as an uninterrupted single-process one.
Undecodable files yield ``None`` and are dropped (and counted) by ``collate_skip``.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .photos import IMAGE_SUFFIXES

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def _to_uint8_array(im) -> np.ndarray:
    """PIL image in any mode (16-bit, CMYK, RGBA, palette, 1-bit) -> (H, W) or (H, W, 3) uint8."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L"))
    if mode in ("RGBA", "RGBa", "P", "PA"):
        rgba = im.convert("RGBA")
        from PIL import Image

        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, not black
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, 1, HSV, LAB ...


def decode_image(path: str | Path, in_chans: int) -> torch.Tensor:
    """Decode a file to a (in_chans, H, W) uint8 tensor; raises on unreadable / truncated files."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # forces a full decode: truncated files fail here, not later
        a = _to_uint8_array(im)
    t = torch.from_numpy(np.array(a))  # a writable copy (PIL arrays are read-only)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return to_channels(t, in_chans)


def to_channels(t: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(C, H, W) uint8 -> ``in_chans`` channels: luminance for 1, repeat gray for 3, cycle otherwise."""
    c = t.shape[0]
    if c == in_chans:
        return t
    if in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114])[:c] if c == 3 else torch.full((c,), 1.0 / c)
        return (t.float() * w.view(-1, 1, 1)).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    reps = -(-in_chans // c)
    return t.repeat(reps, 1, 1)[:in_chans]


class ImageFolderDataset(Dataset):
    """Images under ``root``, recursively. ``labeled``: one class per top-level sub-folder (sorted names)."""

    def __init__(self, root: str | Path, in_chans: int = 3, labeled: bool = False, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        self.in_chans = in_chans
        if labeled:
            found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not found:
                raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
            if classes is not None:  # a validation / eval split numbers its classes as the training run did
                unknown = sorted(set(found) - set(classes))
                if unknown:
                    raise ValueError(f"{root} has classes the model was not trained on: {', '.join(unknown[:5])}")
                found = [c for c in classes if (root / c).is_dir()]
            self.classes = list(classes) if classes is not None else found
            index = {c: i for i, c in enumerate(self.classes)}
            self.samples = [(p, index[c]) for c in found for p in sorted((root / c).rglob("*"))
                            if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            self.classes = []
            self.samples = [(p, -1) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return decode_image(path, self.in_chans), label
        except Exception:
            return None  # counted and reported by the training loop (collate_skip)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = data[0:2], data[2], data[3]
    if dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist() -> Path | None:
    for d in FASHION_MNIST_DIRS:
        p = Path(d)
        if p.is_dir() and any(p.glob("train-images-idx3-ubyte*")):
            return p
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download at run time)."""

    def __init__(self, train: bool = True, in_chans: int = 1, root: str | Path | None = None):
        root = Path(root) if root else find_fashion_mnist()
        if root is None:
            raise FileNotFoundError(
                "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` (files under "
                f"{FASHION_MNIST_DIRS[0]}), or pass a folder holding train-images-idx3-ubyte.gz etc.")
        prefix = "train" if train else "t10k"
        self.images = _read_idx(next(root.glob(f"{prefix}-images-idx3-ubyte*")))  # (N, 28, 28)
        self.labels = _read_idx(next(root.glob(f"{prefix}-labels-idx1-ubyte*"))).astype(np.int64)
        self.in_chans, self.classes = in_chans, list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        t = torch.from_numpy(self.images[i].copy()).unsqueeze(0)
        return to_channels(t, self.in_chans), int(self.labels[i])


class SyntheticImages(Dataset):
    """Deterministic toy images for tests: class k = oriented stripes of frequency k+1, plus noise."""

    def __init__(self, n: int = 64, num_classes: int = 4, size: int = 64, in_chans: int = 3, seed: int = 0):
        self.n, self.num_classes, self.size, self.in_chans, self.seed = n, num_classes, size, in_chans, seed
        self.classes = [f"class{k}" for k in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        k = i % self.num_classes
        yy, xx = torch.meshgrid(torch.linspace(0, 1, self.size), torch.linspace(0, 1, self.size), indexing="ij")
        angle = torch.rand((), generator=g) * 3.1416
        wave = torch.sin(2 * 3.1416 * (k + 1) * (xx * torch.cos(angle) + yy * torch.sin(angle)))
        img = 0.5 + 0.35 * wave + 0.1 * torch.randn(self.in_chans, self.size, self.size, generator=g)
        return (img.clamp(0, 1) * 255).to(torch.uint8), k


class SeededDataset(Dataset):
    """Applies ``transform`` with the global RNG seeded from (seed, epoch, index); indices come from
    ``ResumableSampler`` as ``(index, epoch)`` pairs. A transform with ``joint = True`` is called as
    ``transform(image, label) -> (image, label)`` (detection: boxes move with the pixels).

    An undecodable file is counted and, with ``replace_bad`` (training), replaced by the next decodable one, so
    every process always gets full batches (a skipped step on one DDP rank would desynchronise the others).
    Without it (evaluation) the sample is dropped by ``collate_skip``.
    """

    MAX_CONSECUTIVE_BAD = 32

    def __init__(self, base: Dataset, transform, seed: int = 0, replace_bad: bool = True):
        self.base, self.transform, self.seed, self.replace_bad = base, transform, seed, replace_bad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        bad = 0
        sample = self.base[i]
        while sample is None:
            bad += 1
            if not self.replace_bad:
                return None, bad
            if bad > self.MAX_CONSECUTIVE_BAD:
                raise ValueError(f"more than {self.MAX_CONSECUTIVE_BAD} consecutive files from index {i} cannot "
                                 "be decoded: is this an image dataset?")
            sample = self.base[(i + bad) % len(self.base)]
        img, label = sample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + i) % (2**63))
            if getattr(self.transform, "joint", False):  # box-aware transforms change image and label together
                return self.transform(img, label), bad
            return (self.transform(img), label), bad


def collate_skip(batch):
    """Collate ``SeededDataset`` items; drops samples that could not be decoded.
    Returns ``(images or None, labels or None, n_undecodable)``."""
    good = [s for s, _ in batch if s is not None]
    bad = sum(b for _, b in batch)
    if not good:
        return None, None, bad
    imgs = torch.stack([s[0] for s in good])
    if isinstance(good[0][1], torch.Tensor):  # e.g. Pix2Seq token sequences, one equal-length row per image
        labels = torch.stack([s[1] for s in good])
    else:
        labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    return imgs, labels, bad


class ResumableSampler(torch.utils.data.Sampler):
    """Epoch-seeded permutation, split into global batches of ``batch * world``; rank r takes its slice of
    each global batch (so N processes see the same global batches as one process with N× the batch);
    ``start_batch`` skips batches already trained on (resume). Yields ``(index, epoch)``."""

    def __init__(self, n: int, batch: int, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1,
                 start_batch: int = 0, shuffle: bool = True, max_batches: int | None = None):
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, epoch
        self.rank, self.world, self.start_batch, self.shuffle = rank, world, start_batch, shuffle
        self.num_batches = n // (batch * world)  # drop_last: every step has a full global batch
        if max_batches is not None:  # e.g. a whole number of accumulation cycles
            self.num_batches = min(self.num_batches, max_batches)
        if self.num_batches == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch ({batch} x {world} "
                             "processes); lower data.batch_size")

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch

    def __iter__(self):
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            perm = torch.arange(self.n)
        gb = self.batch * self.world
        for b in range(self.start_batch, self.num_batches):
            chunk = perm[b * gb + self.rank * self.batch: b * gb + (self.rank + 1) * self.batch]
            for i in chunk.tolist():
                yield (i, self.epoch)
