"""Datasets: image folders (unlabeled, or class sub-folders), Fashion-MNIST from Debian's package, synthetic.

Every dataset returns ``(image uint8 tensor (C, H, W), label)`` (label -1 when unlabeled); transforms are
applied by ``SeededDataset``, which seeds each sample's augmentation from (seed, epoch, index) so a resumed
or distributed run sees exactly the same augmented images as an uninterrupted single-process one.
A file that cannot be read (undecodable, over ``data.max_pixels``, not a regular file) yields an ``Unreadable``
record instead of a sample; ``collate_skip`` collects them per batch, keyed by path, so callers count files, not
attempts, and can name them.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import random
import stat
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

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


class Unreadable(NamedTuple):
    """A file skipped instead of a sample, and why."""
    path: str
    reason: str


class ImageTooLarge(ValueError):
    """The image would decode to more pixels than allowed (``data.max_pixels``)."""


class NotRegularFile(ValueError):
    """A FIFO, socket, device or dangling link: opening it for reading could block forever."""


def _kind(mode: int) -> str:
    return ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def list_image_files(root: str | Path) -> tuple[list[Path], list[Unreadable]]:
    """Files with an image suffix under ``root`` (recursive, sorted), regular files only; the others (FIFOs,
    sockets, devices, dangling links) are returned apart so callers can count and name them."""
    files, skipped = [], []
    for p in sorted(Path(root).rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
            continue
        try:
            mode = p.stat().st_mode
        except OSError as e:
            skipped.append(Unreadable(str(p), f"cannot stat ({e.strerror or e})"))
            continue
        if stat.S_ISREG(mode):
            files.append(p)
        else:
            skipped.append(Unreadable(str(p), _kind(mode)))
    return files, skipped


def decode_min_side(img_size: int, crop_scale_min: float = 1.0) -> int:
    """Shorter side a decoded image needs so that neither training's smallest RandomResizedCrop
    (``crop_scale_min`` of the area) nor the eval resize (``img_size / 0.875``) is upsampled."""
    return int(np.ceil(img_size * max(1 / 0.875, 1 / np.sqrt(crop_scale_min))))


def decode_image(path: str | Path, in_chans: int, max_pixels: int = 0, min_side: int = 0,
                 keep_16bit: bool = False) -> torch.Tensor:
    """Decode a file to a (in_chans, H, W) uint8 tensor; raises on unreadable / truncated files.

    Only regular files are read (a FIFO would block forever). ``min_side`` > 0: a JPEG is decoded at the
    smallest 1/2, 1/4 or 1/8 scale whose shorter side is still >= ``min_side`` (PIL ``draft``: the DCT does the
    reduction, far cheaper than decoding every pixel). ``max_pixels`` > 0: an image that would still decode to
    more pixels raises ``ImageTooLarge`` before any pixel is decoded. PIL's own decompression-bomb limit
    (2 x ``Image.MAX_IMAGE_PIXELS``) also raises ``ImageTooLarge``. ``keep_16bit``: a 16-bit grayscale image
    stays a uint16 tensor, every value kept (torchvision's v2 transforms and ``ToDtype(scale=True)`` take uint16)."""
    # O_NONBLOCK: opening a FIFO returns at once (a plain open waits for a writer); fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(_kind(mode))
        return decode_stream(f, in_chans, max_pixels, min_side, keep_16bit)


def decode_stream(f, in_chans: int, max_pixels: int = 0, min_side: int = 0, keep_16bit: bool = False) -> torch.Tensor:
    """``decode_image`` on an open binary file object (a file, or ``io.BytesIO`` of a tar shard's member)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
        try:
            im = Image.open(f)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from None
    with im:
        if min_side > 0 and im.format == "JPEG":
            im.draft(im.mode, (min_side, min_side))  # keeps both sides >= min_side
        w, h = im.size
        if max_pixels > 0 and w * h > max_pixels:
            raise ImageTooLarge(f"{w}x{h} = {w * h} pixels, over data.max_pixels={max_pixels}")
        im.load()  # forces a full decode: truncated files fail here, not later
        if keep_16bit and im.mode.startswith("I;16"):
            a = np.asarray(im).astype(np.uint16)  # native byte order, values unchanged
        else:
            a = _to_uint8_array(im)
    t = torch.from_numpy(np.array(a))  # a writable copy (PIL arrays are read-only)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return to_channels(t, in_chans)


def to_channels(t: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(C, H, W) uint8 -> ``in_chans`` channels: luminance for 1, repeat gray for 3, cycle otherwise (a uint16
    gray image repeats as uint16)."""
    c = t.shape[0]
    if c == in_chans:
        return t
    if in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114])[:c] if c == 3 else torch.full((c,), 1.0 / c)
        return (t.float() * w.view(-1, 1, 1)).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    reps = -(-in_chans // c)
    return t.repeat(reps, 1, 1)[:in_chans]


def class_folders(root: Path) -> list[str]:
    """The class names of a labeled folder: its top-level sub-folders, sorted, hidden ones left out."""
    return sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))


class ImageFolderDataset(Dataset):
    """Images under ``root``, recursively. ``labeled``: one class per top-level sub-folder (sorted names).

    ``skipped``: files not listed because they are not regular files; ``loose``: (labeled) image files directly
    in ``root``, which belong to no class. ``max_pixels`` / ``min_side`` / ``keep_16bit``: see ``decode_image``."""

    def __init__(self, root: str | Path, in_chans: int = 3, labeled: bool = False, classes: list[str] | None = None,
                 max_pixels: int = 0, min_side: int = 0, keep_16bit: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        self.root, self.in_chans, self.max_pixels, self.min_side = root, in_chans, max_pixels, min_side
        self.keep_16bit = keep_16bit
        self.loose: list[Path] = []
        if labeled:
            found = class_folders(root)
            if not found:
                raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
            if classes is not None:  # a validation / eval split numbers its classes as the training run did
                unknown = sorted(set(found) - set(classes))
                if unknown:
                    raise ValueError(f"{root} has classes the model was not trained on: {', '.join(unknown[:5])}")
                found = [c for c in classes if (root / c).is_dir()]
            self.classes = list(classes) if classes is not None else found
            index = {c: i for i, c in enumerate(self.classes)}
            self.samples, self.skipped = [], []
            for c in found:
                files, skipped = list_image_files(root / c)
                self.samples += [(p, index[c]) for p in files]
                self.skipped += skipped
            self.loose = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            self.classes = []
            files, self.skipped = list_image_files(root)
            self.samples = [(p, -1) for p in files]
        if not self.samples:
            also = f" ({describe_unreadable(self.skipped)})" if self.skipped else ""
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}{also}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return decode_image(path, self.in_chans, self.max_pixels, self.min_side, self.keep_16bit), label
        except Exception as e:  # counted and reported by the caller (collate_skip)
            return Unreadable(str(path), unreadable_reason(e))


def image_folder_of(ds: Dataset) -> ImageFolderDataset | None:
    """The ``ImageFolderDataset`` under ``ds`` (through ``Subset`` / ``SeededDataset`` wrappers), if any."""
    while isinstance(ds, (Subset, SeededDataset)):
        ds = ds.dataset if isinstance(ds, Subset) else ds.base
    return ds if isinstance(ds, ImageFolderDataset) else None


def unreadable_reason(e: Exception) -> str:
    """A short reason for a file that could not be decoded (no traceback, no file object repr)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not a decodable image"
    if isinstance(e, (ImageTooLarge, NotRegularFile)):
        return str(e)
    text = (str(e).splitlines() or [""])[0][:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def describe_unreadable(files: dict[str, str] | list[Unreadable], first: int = 5) -> str:
    """'3 file(s) skipped: a.png (not a decodable image), b.jpg (FIFO), ... and 1 more'."""
    items = sorted(files.items()) if isinstance(files, dict) else sorted(files)
    shown = ", ".join(f"{p} ({why})" for p, why in items[:first])
    more = f" and {len(items) - first} more" if len(items) > first else ""
    return f"{len(items)} file(s) skipped: {shown}{more}"


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


@contextlib.contextmanager
def forked_rngs(devices=()):
    """Run a block on copies of the global RNGs: torch's CPU generator (and those of the CUDA ``devices``),
    Python's ``random`` and NumPy's; all are restored afterwards, whatever the block drew."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU RNG, Python's ``random`` and NumPy's global RNG all seeded from ``seed``, and
    restore all three afterwards. Augmentations draw from any of them (torchvision: torch; timm's transforms:
    ``random`` and torch; timm's Mixup: NumPy), so seeding only torch would leave timm's unreproducible."""
    with forked_rngs():
        # the CPU generator only (the one forked; transforms run on the CPU): torch.manual_seed would also reseed
        # every CUDA device, and costs ~100x more per sample
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds
        yield


class SeededDataset(Dataset):
    """Applies ``transform`` with the global RNGs (torch, ``random``, NumPy: ``seeded``) seeded from (seed, epoch,
    index); indices come from
    ``ResumableSampler`` as ``(index, epoch)`` pairs. Returns ``(sample or None, unreadable records)``. A
    transform with ``joint = True`` is called as ``transform(image, label) -> (image, label)`` (detection:
    boxes move with the pixels).

    An unreadable file is recorded and, with ``replace_bad`` (training), replaced by the next readable one, so
    every process always gets full batches (a skipped step on one DDP rank would desynchronise the others).
    Without it (evaluation) the sample is dropped by ``collate_skip``.
    """

    MAX_CONSECUTIVE_BAD = 32

    def __init__(self, base: Dataset, transform, seed: int = 0, replace_bad: bool = True):
        self.base, self.transform, self.seed, self.replace_bad = base, transform, seed, replace_bad

    def __len__(self) -> int:
        return len(self.base)

    def _get(self, j: int):
        sample = self.base[j]
        return Unreadable(f"#{j}", "unreadable") if sample is None else sample

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        bad: list[Unreadable] = []
        sample = self._get(i)
        while isinstance(sample, Unreadable):
            bad.append(sample)
            if not self.replace_bad:
                return None, tuple(bad)
            if len(bad) > self.MAX_CONSECUTIVE_BAD:
                raise ValueError(f"{len(bad)} consecutive files from {bad[0].path} cannot be read "
                                 f"({bad[0].reason}): is this an image dataset?")
            sample = self._get((i + len(bad)) % len(self.base))
        return seeded_apply(self.transform, sample, self.seed, epoch, i), tuple(bad)


def seeded_apply(transform, sample: tuple, seed: int, epoch: int, key: int) -> tuple:
    """``(transform(image), label)`` (or ``transform(image, label)`` for a ``joint`` transform) with the global
    RNGs seeded from (seed, epoch, key) (``seeded``) and restored after: a sample's augmentation depends on its
    key alone, not on which worker or process drew it (exact resume, any worker count)."""
    img, label = sample
    with seeded((seed * 1_000_003 + epoch * 100_003 + key) % (2**63)):
        if getattr(transform, "joint", False):  # box-aware transforms change image and label together
            return transform(img, label)
        return transform(img), label


def collate_skip(batch):
    """Collate ``SeededDataset`` items; drops samples that could not be read.
    Returns ``(images or None, labels or None, {path: reason} of the unreadable files met)``."""
    good = [s for s, _ in batch if s is not None]
    bad = {u.path: u.reason for _, records in batch for u in records}
    if not good:
        return None, None, bad
    imgs = torch.stack([s[0] for s in good])
    if isinstance(good[0][1], torch.Tensor):  # e.g. Pix2Seq token sequences, one equal-length row per image
        labels = torch.stack([s[1] for s in good])
    elif isinstance(good[0][1], dict):  # detection targets (boxes, masks: a different count per image): a list
        labels = [s[1] for s in good]
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
