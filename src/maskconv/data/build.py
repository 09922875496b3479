"""Dataset and transform construction from a ``DataCfg`` (torchvision v2 transforms)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .datasets import FashionMNIST, ImageFolderDataset, SyntheticImages, decode_min_side
from .photos import bundled_photos, default_norm
from .hf import is_hf
from .shards import is_shards
from .stream import is_stream

NAMED = ("synthetic", "fashion-mnist", "photos")


class _Photos(Dataset):
    """scikit-image's bundled photos as an unlabeled dataset of ``length`` items (cycled)."""

    def __init__(self, in_chans: int, length: int = 1024):
        from .datasets import to_channels

        self.images = [to_channels(torch.from_numpy(p).permute(2, 0, 1).contiguous(), in_chans)
                       for p in bundled_photos().values()]
        self.length, self.classes = length, []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.images[i % len(self.images)], -1


def build_transform(cfg, in_chans: int, train: bool, weak: bool = False):
    """Train: RandomResizedCrop (+ flip, RandAugment, RandomErasing when asked); with ``data.augment_lib=timm``
    (fine-tuning only) timm's pipeline instead (``timm_train_transform``). ``weak``: crop + flip only, the
    augmentation of pretraining and of MAE's linear probe (main_pretrain.py, main_linprobe.py). Eval: resize by
    1/0.875 and centre-crop below 384 px, warp-resize at >= 384 (official ConvNeXt eval)."""
    from torchvision.transforms import v2

    size = cfg.img_size
    mean, std = normalization(cfg, in_chans)
    if train and not weak and cfg.augment_lib == "timm":
        return timm_train_transform(cfg, in_chans)
    if train:
        t = [v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0),
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if cfg.hflip:
            t.append(v2.RandomHorizontalFlip())
        if cfg.rand_augment and not weak:
            n, m = _parse_randaug(cfg.rand_augment)
            t.append(v2.RandAugment(num_ops=n, magnitude=m))
        t += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if cfg.reprob > 0 and not weak:
            t.append(v2.RandomErasing(p=cfg.reprob, value=0))
        return v2.Compose(t)
    if size < 384:
        resize = [v2.Resize(int(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                  v2.CenterCrop(size)]
    else:
        resize = [v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose(resize + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _timm(what: str):
    """``import timm`` for ``what``, or one line naming the extra that installs it."""
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs timm: pip install 'maskconv[augment]'") from None


def timm_train_transform(cfg, in_chans: int):
    """The official fine-tuning train transform: ``build_transform(is_train=True)`` of ConvNeXt(-V2) /
    MAE ``datasets.py`` (facebookresearch/ConvNeXt-V2 datasets.py, main_finetune.py), i.e. timm's
    ``create_transform(is_training=True, ...)`` with our ``data.*`` values (``auto_augment`` = official ``--aa``,
    ``interpolation`` = ``--train_interpolation``, ``reprob`` / ``remode`` / ``recount`` = ``--reprob`` / ``--remode``
    / ``--recount``; ``crop_scale_min`` and ``hflip`` give timm's defaults 0.08 and 0.5 in the official recipes) and
    the official swap of RandomResizedCrop for ``RandomCrop(size, padding=4)`` at ``img_size <= 32`` (CIFAR-size).
    timm works on PIL images: our uint8 (C, H, W) sample goes through ``to_pil_image`` first (1 channel -> 'L',
    3 -> 'RGB'; a 16-bit grayscale sample is reduced to 8 bits, as PIL's augmentations need). Output: normalised
    float (C, img_size, img_size), as the torchvision pipeline's."""
    _timm("data.augment_lib=timm")
    from timm.data import create_transform
    from torchvision import transforms

    if in_chans not in (1, 3):
        raise ValueError(f"data.augment_lib=timm takes 1- or 3-channel images (PIL); model.in_chans={in_chans}")
    mean, std = normalization(cfg, in_chans)
    try:
        tf = create_transform(input_size=cfg.img_size, is_training=True, scale=(cfg.crop_scale_min, 1.0),
                              hflip=0.5 if cfg.hflip else 0.0, color_jitter=cfg.color_jitter,
                              auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation,
                              re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=mean, std=std)
    except (AssertionError, KeyError, ValueError) as e:  # timm asserts on a policy string it cannot parse
        raise ValueError(f"data.auto_augment={cfg.auto_augment!r}: timm cannot build it ({type(e).__name__}: {e}); "
                         "e.g. rand-m9-mstd0.5-inc1") from None
    if cfg.img_size <= 32:  # official build_transform: resize_im = input_size > 32
        tf.transforms[0] = transforms.RandomCrop(cfg.img_size, padding=4)
    for t in tf.transforms:  # this pipeline's own auto-augment ops (instance attributes; timm's module untouched)
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return transforms.Compose([ToPIL(), tf])


def posterize(img, bits_to_keep: int, **_):
    """timm's auto-augment posterize (keep the ``bits_to_keep`` most significant bits) under any Pillow. timm's
    ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which rand-m9-mstd0.5 draws ~2% of the time (about 1
    image in 700); Pillow >= 13 refuses 0 bits (a crash mid-epoch), older Pillow (the official runs') returned a
    black image, as here."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


class ToPIL:
    """uint8 / uint16 (C, H, W) tensor -> PIL image (timm's transforms take PIL); 16 bits are rounded to 8."""

    def __call__(self, img: torch.Tensor):
        from torchvision.transforms.v2.functional import to_pil_image

        if img.dtype != torch.uint8:
            img = (img.float() * (255 / 65535) if img.dtype == torch.uint16 else img.float()).round().to(torch.uint8)
        return to_pil_image(img)

    def __repr__(self) -> str:
        return "ToPIL()"


class TimmMixup:
    """timm's ``Mixup`` (the official fine-tuning's MixUp / CutMix, with label smoothing folded into its soft
    targets) as a batch transform ``(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, K))``.
    timm draws from NumPy's global RNG; here NumPy is seeded from one draw of torch's, which a checkpoint saves,
    so a resumed run mixes exactly as an uninterrupted one. timm mixes each image with its mirror in the batch:
    the batch size must be even."""

    def __init__(self, cfg, num_classes: int):
        _timm("data.augment_lib=timm with data.mixup / data.cutmix")
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                           label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .datasets import seeded

        if len(images) % 2:
            raise ValueError(f"timm's Mixup needs an even batch, got {len(images)} images (data.batch_size)")
        with seeded(int(torch.randint(2**62, ()))):
            return self.mixup(images, labels)


def build_mixup(cfg, num_classes: int):
    """The batch transform of fine-tuning, or None: MixUp / CutMix when ``data.mixup`` or ``data.cutmix`` > 0,
    timm's (``TimmMixup``: soft targets with the label smoothing in them) with ``data.augment_lib=timm``, else
    torchvision v2's (one of the two, uniformly, per batch)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if cfg.augment_lib == "timm":
        return TimmMixup(cfg, num_classes)
    from torchvision.transforms import v2

    choices = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup > 0 else []) + \
              ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix > 0 else [])
    return v2.RandomChoice(choices)


def normalization(cfg, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel: ``data.mean`` / ``data.std`` when set (``maskconv data stats`` computes them),
    else ImageNet's for RGB and 0.5 otherwise (``default_norm``)."""
    mean, std = default_norm(in_chans)
    given = {k: getattr(cfg, k, None) for k in ("mean", "std")}
    for k, v in given.items():
        if v is not None and len(v) != in_chans:
            raise ValueError(f"data.{k} has {len(v)} values; the model takes {in_chans} channel(s)")
    if given["std"] is not None and min(given["std"]) <= 0:
        raise ValueError(f"data.std={tuple(given['std'])}: every value must be > 0")
    return (tuple(given["mean"]) if given["mean"] is not None else mean,
            tuple(given["std"]) if given["std"] is not None else std)


def _parse_randaug(spec: str) -> tuple[int, int]:
    """'n2-m9' -> (2, 9)."""
    try:
        parts = dict((p[0], int(p[1:])) for p in spec.split("-"))
        return parts.get("n", 2), parts.get("m", 9)
    except (ValueError, IndexError):
        raise ValueError(f"data.rand_augment={spec!r}: expected e.g. 'n2-m9'") from None


def build_dataset(cfg, in_chans: int, split: str = "train", labeled: bool = True, seed: int = 0,
                  classes: list[str] | None = None) -> Dataset:
    """``cfg.path``: a named dataset (synthetic | fashion-mnist | photos), a folder, or WebDataset shards
    (``shards:<folder>`` / ``shards:/p/shard-{000000..000009}.tar``, ``data/shards.py``), or a Hugging Face
    ``save_to_disk`` folder (``hf:<folder>``, ``data/hf.py``), or a stream for training (``wds:<tar urls>``,
    ``hf-stream:<dataset>``, ``data/stream.py``). A folder with ``train/``
    and ``val/`` sub-folders is split by them; otherwise the folder itself is the training set (and holds class
    sub-folders when ``labeled``), less the ``cfg.val_fraction`` of each class held out as ``val``. ``classes``
    fixes the class numbering (validation / eval of a trained model)."""
    name = cfg.path
    if not name:  # never the current folder, never noise by default
        raise ValueError(f"no data named (data.path is empty): an image folder or one of {', '.join(NAMED)}")
    if name == "synthetic":
        ds = SyntheticImages(n=64 if split == "train" else 32, num_classes=4, size=cfg.img_size, in_chans=in_chans,
                             seed=0 if split == "train" else 1)
    elif name == "fashion-mnist":
        ds = FashionMNIST(train=split == "train", in_chans=in_chans)
    elif name == "photos":
        if labeled:
            raise ValueError("data.path=photos has no labels: use it for pretraining only")
        ds = _Photos(in_chans)
    elif is_stream(name):
        from .stream import StreamDataset

        if split != "train":
            raise ValueError(f"data.path={name} is a stream: it can be a training source only (give the "
                             "validation images as a folder, shards: or hf: source)")
        if labeled and cfg.val_fraction > 0:
            raise ValueError(f"data.val_fraction holds out part of a folder; {name} is a stream (no index)")
        ds = StreamDataset(name, in_chans, labeled=labeled, length=cfg.stream_length,
                           shuffle_buffer=cfg.shuffle_buffer, classes=classes if labeled else None,
                           max_pixels=cfg.max_pixels, min_side=decode_min_side(cfg.img_size, cfg.crop_scale_min),
                           keep_16bit=in_chans == 1)
        if labeled and cfg.labels_per_class > 0:
            raise ValueError("data.labels_per_class picks images by index; a stream has none")
        return ds
    else:
        decode = dict(max_pixels=cfg.max_pixels, min_side=decode_min_side(cfg.img_size, cfg.crop_scale_min),
                      keep_16bit=in_chans == 1)  # a 16-bit grayscale file reaches a 1-channel model losslessly
        split_dirs = has_splits(name)
        holdout = labeled and cfg.val_fraction > 0 and not split_dirs
        if split != "train" and not split_dirs and not holdout:
            raise FileNotFoundError(f"{name} has no {split}/ folder (expected {name}/train and {name}/val, or set "
                                    "data.val_fraction to hold out part of each class)")
        if is_shards(name):
            from .shards import ShardDataset, shard_splits

            ds = ShardDataset(shard_splits(name)[split if split_dirs else None], in_chans, labeled=labeled,
                              classes=classes if labeled else None, **decode)
        elif is_hf(name):
            from .hf import HFImageDataset, hf_splits

            ds = HFImageDataset(hf_splits(name)[split if split_dirs else None], in_chans, labeled=labeled,
                                classes=classes if labeled else None, **decode)
        else:
            ds = ImageFolderDataset(Path(name) / split if split_dirs else Path(name), in_chans, labeled=labeled,
                                    classes=classes if labeled else None, **decode)
        if holdout:
            ds = holdout_split(ds, cfg.val_fraction)[1 if split == "val" else 0]
    if split == "train" and labeled and cfg.labels_per_class > 0:
        ds = labels_subset(ds, cfg.labels_per_class, seed)
    return ds


def has_splits(path: str) -> bool:
    """Whether a folder (or ``shards:`` folder) holds ``train/`` and ``val/``; a missing folder is an error."""
    if is_stream(path):  # a stream is a training source only
        return False
    if is_shards(path):
        from .shards import shard_splits

        return None not in shard_splits(path)
    if is_hf(path):
        from .hf import hf_splits

        return None not in hf_splits(path)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data.path {path!r} is neither a folder nor one of {', '.join(NAMED)} (nor "
                                "shards:<folder or pattern>, hf:<save_to_disk folder>)")
    return (root / "train").is_dir() and (root / "val").is_dir()


def holdout_split(ds: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """(train, val) subsets of a labeled data set: ``round(fraction * n)`` images of each class go to val, drawn by
    a fixed seed from the sorted file list, so training and a later ``eval`` hold out the same images."""
    labels = torch.as_tensor(ds.labels)
    g = torch.Generator().manual_seed(0)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = round(fraction * len(idx))
        if k == len(idx):
            raise ValueError(f"data.val_fraction={fraction} would leave class {ds.classes[c]!r} ({len(idx)} images) "
                             "with nothing to train on")
        val += idx[:k]
        train += idx[k:]
    parts = Subset(ds, sorted(train)), Subset(ds, sorted(val))
    for p in parts:
        p.classes, p.labels = ds.classes, labels[p.indices].tolist()  # labels: no decoding to learn them
    return parts


def labels_subset(ds: Dataset, per_class: int, seed: int = 0) -> Subset:
    """A deterministic subset with ``per_class`` samples of each class (semi-supervised fine-tuning)."""
    labels = ds.labels if hasattr(ds, "labels") else [ds[i][1] for i in range(len(ds))]
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} samples, fewer than labels_per_class={per_class}")
        keep += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    sub = Subset(ds, sorted(keep))
    sub.classes = getattr(ds, "classes", [])
    return sub


def num_classes_of(ds: Dataset) -> int:
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes)
    raise ValueError("the dataset has no classes (an unlabeled folder?): fine-tuning needs class sub-folders")
