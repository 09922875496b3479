"""Hugging Face ``datasets`` as a data source: ``data.path=hf:<folder>``, a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``, memory-mapped
Arrow, nothing downloaded). ``datasets`` is an optional extra, imported only here.

The image column is the first ``datasets.Image`` feature, the label the first ``ClassLabel`` (its names are the
classes). Images are read undecoded (``Image(decode=False)``: the stored file bytes) and decoded by
``decode_stream``, the decoder every other source uses (16-bit kept, pixel limit, JPEG reduce-on-decode). A
``DatasetDict`` with ``train`` and ``validation`` (or ``val``) is split by them, as a folder with train/ + val/.
Rows are read by index, so the engine's sampler, per-sample seeds and exact resume apply unchanged. A streaming
``IterableDataset`` has no index: it is read as a stream (``data.path=hf-stream:...``, ``data/stream.py``).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from torch.utils.data import Dataset

from .datasets import Unreadable, decode_image, decode_stream, unreadable_reason

SCHEME = "hf:"
VAL_SPLITS = ("validation", "val")


def is_hf(path: str) -> bool:
    return str(path).startswith(SCHEME)


def load_hf(spec: str):
    """``hf:<folder>`` -> the ``datasets.Dataset`` or ``DatasetDict`` saved there."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.path={spec} needs the datasets package: pip install 'maskconv[hf]'") from None
    folder = Path(spec[len(SCHEME):])
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path={spec}: {folder} is not a folder written by save_to_disk")
    try:
        return datasets.load_from_disk(str(folder))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.path={spec}: not a Hugging Face datasets folder ({e})") from None


def hf_splits(spec: str) -> dict:
    """``{None: dataset}`` or ``{'train': ..., 'val': ...}`` (a DatasetDict with train + validation)."""
    import datasets

    d = load_hf(spec)
    if isinstance(d, datasets.DatasetDict):
        val = next((k for k in VAL_SPLITS if k in d), None)
        if "train" in d and val is not None:
            return {"train": d["train"], "val": d[val]}
        if "train" in d:
            return {None: d["train"]}
        raise ValueError(f"data.path={spec}: a DatasetDict without a 'train' split (it has {', '.join(d)})")
    if not isinstance(d, datasets.Dataset):
        raise ValueError(f"data.path={spec}: {type(d).__name__} has no index; save a map-style Dataset")
    return {None: d}


class HFImageDataset(Dataset):
    """Rows of a ``datasets.Dataset`` as ``(image uint8 (C, H, W), label)`` (label -1 when unlabeled) or
    ``Unreadable``, like ``ImageFolderDataset``. ``classes`` renumbers labels as a training run numbered them."""

    def __init__(self, ds, in_chans: int = 3, labeled: bool = False, classes: list[str] | None = None,
                 max_pixels: int = 0, min_side: int = 0, keep_16bit: bool = False):
        import datasets

        self.in_chans, self.max_pixels, self.min_side, self.keep_16bit = in_chans, max_pixels, min_side, keep_16bit
        feats = ds.features
        self.image_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        if self.image_col is None:
            raise ValueError(f"the Hugging Face dataset has no Image column (columns: {', '.join(feats)})")
        label_col = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        self.ds = ds.cast_column(self.image_col, datasets.Image(decode=False))  # bytes / path: our decoder decodes
        self.classes, self._labels = [], [-1] * len(ds)
        if labeled:
            if label_col is None:
                raise ValueError("the Hugging Face dataset has no ClassLabel column: use it for pretraining only")
            own = list(feats[label_col].names)
            labels = list(ds[label_col])
            if classes is not None:
                unknown = sorted({own[c] for c in labels} - set(classes))
                if unknown:
                    raise ValueError(f"the dataset has classes the model was not trained on: {', '.join(unknown[:5])}")
                index = {c: i for i, c in enumerate(classes)}
                labels = [index[own[c]] for c in labels]
            self.classes, self._labels = list(classes) if classes is not None else own, labels
        if len(ds) == 0:
            raise ValueError("the Hugging Face dataset has no rows")

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    def __getitem__(self, i: int):
        cell = self.ds[i][self.image_col]  # {"bytes": ..., "path": ...}
        name = cell.get("path") or f"row {i}"
        try:
            if cell.get("bytes") is not None:
                img = decode_stream(io.BytesIO(cell["bytes"]), self.in_chans, self.max_pixels, self.min_side,
                                    self.keep_16bit)
            else:
                img = decode_image(cell["path"], self.in_chans, self.max_pixels, self.min_side, self.keep_16bit)
            return img, self._labels[i]
        except Exception as e:  # counted and reported by the caller (collate_skip)
            return Unreadable(name, unreadable_reason(e))

    def fingerprint(self) -> str:
        """Row count + hash of the Arrow files' (name, size)."""
        h = hashlib.sha256()
        for f in self.ds.cache_files:
            p = f["filename"]
            h.update(f"{os.path.basename(p)}\0{os.path.getsize(p) if os.path.exists(p) else -1}\n".encode())
        return f"{len(self)} rows, sha256 {h.hexdigest()[:16]}"
