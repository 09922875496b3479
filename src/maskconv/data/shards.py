"""WebDataset tar shards: ``write_shards`` (an image folder -> shards, with the ``webdataset`` library's
``ShardWriter``) and ``ShardDataset`` (the shards as an indexed data set, ``data.path=shards:...``).

Layout (the WebDataset convention, readable by ``webdataset.WebDataset``): sample ``k`` is the tar members
``{k:08d}.<ext>`` (the source file's bytes unchanged: no re-encoding, so it decodes to the same pixels),
``{k:08d}.cls`` (class index, when the file sits in a class folder) and ``{k:08d}.path`` (its path under the
source folder). ``shards.json`` beside the tars names the classes, counts and source; ``<shard>.idx.json`` holds
each tar's member offsets (optional: shards without it, e.g. written by other tools, are scanned once). A source folder with
``train/`` and ``val/`` gives ``out/train/*.tar`` and ``out/val/*.tar``, as a folder would be split.

Order, distribution and resume (see docs/DECISIONS.md): sample ``k`` of the shards is sample ``k`` of the
folder as ``ImageFolderDataset`` lists it, and ``ShardDataset`` reads any sample by index (each tar's member
offsets are read once, then one ``os.pread`` per member). So the engine's contract holds unchanged: the
``ResumableSampler`` permutation splits each global batch by rank, DataLoader workers take whole batches,
``SeededDataset`` seeds and keyed masks are per global index, and a resumed run skips exactly the batches it
had consumed. Shards and the folder they came from give the same images in the same order for a seed and a
world size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections import OrderedDict
from pathlib import Path

from torch.utils.data import Dataset

from ..commands import Command
from .datasets import Unreadable, class_folders, decode_stream, list_image_files, unreadable_reason
from .photos import IMAGE_SUFFIXES

SCHEME = "shards:"
MANIFEST = "shards.json"
SHARD_PATTERN = "shard-%06d.tar"
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key / extension split (tariterators)


def is_shards(path: str) -> bool:
    return str(path).startswith(SCHEME)


def _need_webdataset():
    try:
        import webdataset  # lazy: optional extra
    except ImportError:
        raise ImportError("writing shards needs the webdataset package: pip install 'maskconv[shards]'") from None
    return webdataset


def shard_splits(spec: str) -> dict[str | None, list[Path]]:
    """``shards:DIR`` -> ``{None: DIR's *.tar}``, or ``{'train': ..., 'val': ...}`` when DIR holds ``train/`` and
    ``val/`` folders of tars; ``shards:/p/shard-{000000..000009}.tar`` (WebDataset's brace notation) or
    ``shards:/p/one.tar`` -> ``{None: those files}``. Files are sorted by name (the order they were written)."""
    body = spec[len(SCHEME):] if is_shards(spec) else spec
    if not body:
        raise ValueError("data.path=shards: names no shards: use shards:<folder of .tar> or shards:/p/{000000..000009}.tar")
    root = Path(body)
    if root.is_dir():
        if (root / "train").is_dir() and (root / "val").is_dir():
            return {s: _tars_in(root / s) for s in ("train", "val")}
        return {None: _tars_in(root)}
    if "{" in body:
        from webdataset.shardlists import expand_urls  # braceexpand, as webdataset reads its shard lists

        _need_webdataset()
        files = [Path(u) for u in expand_urls(body)]
    else:
        files = [root]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"data.path={spec}: shard {missing[0]} not found"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {None: files}


def _tars_in(folder: Path) -> list[Path]:
    tars = sorted(p for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())
    if not tars:
        also = [p.name for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        hint = f" ({also[0]} is compressed: shards must be plain .tar to be read by index)" if also else ""
        raise FileNotFoundError(f"no .tar shards in {folder}{hint}")
    return tars


def read_manifest(folder: Path) -> dict:
    f = Path(folder) / MANIFEST
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f} is not JSON ({e}); re-write the shards with `maskconv shards`") from None


def index_suffix(shard: Path) -> Path:
    return shard.with_name(shard.name + ".idx.json")


def tar_index(shard: Path) -> list[tuple]:
    """``(image member, offset, size, (offset, size) of its .path member or None, label or -1)`` per sample of one
    tar, in file order. Read from the ``<shard>.idx.json`` that ``write_shards`` leaves beside it when that
    index matches the tar's size, else by scanning the tar's headers (stdlib ``tarfile``: ~0.1 ms a member)."""
    side = index_suffix(shard)
    if side.is_file():
        try:
            idx = json.loads(side.read_text())
            if idx.get("bytes") == shard.stat().st_size:
                return [tuple(row) for row in idx["samples"]]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged index: scan the tar instead
    return _scan_tar(shard)


def _scan_tar(shard: Path) -> list[tuple]:
    try:
        tar = tarfile.open(shard, "r:")  # plain tar only: compressed members cannot be read by offset
    except tarfile.ReadError as e:
        raise ValueError(f"{shard} is not a plain (uncompressed) tar file ({e})") from None
    groups: dict[str, dict] = {}
    with tar:
        for m in tar:
            if not m.isfile():
                continue
            k = _KEY_EXT.match(m.name)
            if k is not None:
                groups.setdefault(k.group(1), {})[k.group(2).lower()] = (m.name, m.offset_data, m.size)
    rows = []
    with open(shard, "rb") as f:
        for parts in groups.values():
            image = next((v for ext, v in parts.items() if "." + ext.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
            if image is None:
                continue
            label = -1
            if "cls" in parts:
                _, offset, size = parts["cls"]
                text = os.pread(f.fileno(), size, offset).decode("ascii", "replace").strip()
                try:
                    label = int(text)
                except ValueError:
                    raise ValueError(f"{shard}: {parts['cls'][0]} holds {text[:20]!r}, not a class index") from None
            path = parts["path"][1:] if "path" in parts else None
            rows.append((*image, path, label))
    return rows


class ShardDataset(Dataset):
    """Samples of WebDataset tar shards, by index, as ``(image uint8 (C, H, W), label)`` (label -1 when
    unlabeled) or ``Unreadable(shard:member, reason)`` like ``ImageFolderDataset``.

    ``labeled``: only samples with a ``.cls`` member, numbered by ``classes`` (the training run's names) when
    given, else by the manifest's ``classes`` (or ``'0'..'K-1'`` for shards without one). ``max_pixels`` /
    ``min_side`` / ``keep_16bit``: see ``decode_image``. At most ``MAX_OPEN`` shard files are open per process."""

    MAX_OPEN = 64

    def __init__(self, shards: list[Path], in_chans: int = 3, labeled: bool = False, classes: list[str] | None = None,
                 max_pixels: int = 0, min_side: int = 0, keep_16bit: bool = False):
        self.shards = [Path(s) for s in shards]
        self.in_chans, self.max_pixels, self.min_side, self.keep_16bit = in_chans, max_pixels, min_side, keep_16bit
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard index -> descriptor, least recently used first
        manifest = read_manifest(self.shards[0].parent)
        # members: (shard index, image member name, data offset, size, its .path member or None) per sample;
        # labels: class index or -1
        members, labels = [], []
        for si, shard in enumerate(self.shards):
            for member, offset, size, path, label in tar_index(shard):
                members.append((si, member, offset, size, tuple(path) if path else None))
                labels.append(label)
        if labeled:
            have = [i for i, c in enumerate(labels) if c >= 0]
            if not have:
                raise ValueError(f"{self.shards[0].parent}: the shards hold no labels (.cls members): they were written "
                                 "from a folder without class sub-folders; use them for pretraining")
            own = manifest.get("classes") or [str(c) for c in range(max(labels) + 1)]
            if classes is not None:  # a validation / eval split numbers its classes as the training run did
                unknown = sorted({own[labels[i]] for i in have} - set(classes))
                if unknown:
                    raise ValueError(f"{self.shards[0].parent} has classes the model was not trained on: "
                                     f"{', '.join(unknown[:5])}")
                index = {c: i for i, c in enumerate(classes)}
                labels = [index[own[c]] if c >= 0 else -1 for c in labels]
            self.classes = list(classes) if classes is not None else list(own)
            members, labels = [members[i] for i in have], [labels[i] for i in have]
        else:
            self.classes, labels = [], [-1] * len(labels)
        if not members:
            raise ValueError(f"no image samples ({', '.join(IMAGE_SUFFIXES)}) in the shards {self.shards[0]} ...")
        self.members, self._labels = members, labels

    def _read(self, si: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(si)
        if fd is None:  # opened lazily, per process (pread needs no shared file position: safe after fork)
            if len(self._fds) >= self.MAX_OPEN:  # 1.28M images in 1281 shards would pass the usual 1024-fd limit
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[si] = os.open(self.shards[si], os.O_RDONLY)
        else:
            self._fds.move_to_end(si)
        return os.pread(fd, size, offset)

    def __getstate__(self):  # DataLoader workers under spawn: file descriptors do not travel
        return {**self.__dict__, "_fds": OrderedDict()}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self.members)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    def __getitem__(self, i: int):
        si, member, offset, size, path = self.members[i]
        try:
            data = self._read(si, offset, size)
            if len(data) != size:
                raise EOFError(f"truncated shard ({len(data)} of {size} bytes)")
            img = decode_stream(io.BytesIO(data), self.in_chans, self.max_pixels, self.min_side, self.keep_16bit)
            return img, self._labels[i]
        except Exception as e:  # counted and reported by the caller (collate_skip)
            return Unreadable(f"{self.shards[si]}:{self._source_name(si, member, path)}", unreadable_reason(e))

    def _source_name(self, si: int, member: str, path) -> str:
        """The file's path in the source folder (its ``.path`` member), else the tar member's name."""
        try:
            return self._read(si, *path).decode("utf-8") if path else member
        except (OSError, UnicodeDecodeError):
            return member

    def fingerprint(self) -> str:
        """Cheap identity for a run's resume check: sample count + hash of (shard name, member, size)."""
        h = hashlib.sha256()
        for si, member, _offset, size, _path in self.members:
            h.update(f"{self.shards[si].name}\0{member}\0{size}\n".encode())
        return f"{len(self.members)} shard samples, sha256 {h.hexdigest()[:16]}"


def write_shards(src: str | Path, out: str | Path, shard_size: int = 1000) -> dict:
    """Write the images under ``src`` as WebDataset tar shards in ``out`` (which must not hold shards yet) and
    return the manifest. A file in a class folder (a top-level sub-folder) keeps its class as ``.cls``; ``src``
    with ``train/`` and ``val/`` gives ``out/train`` and ``out/val`` (val numbered by train's classes). Written
    into a temporary folder renamed at the end: an interrupted run leaves no half set of shards."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--data {src}: not a folder")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: choose a new one")
    _need_webdataset()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if (src / "train").is_dir() and (src / "val").is_dir():
            train = _write_split(src / "train", tmp / "train", shard_size, None)
            val = _write_split(src / "val", tmp / "val", shard_size, train["classes"])
            manifest = {"splits": {"train": train, "val": val}}
        else:
            manifest = _write_split(src, tmp, shard_size, None)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(src: Path, out: Path, shard_size: int, classes: list[str] | None) -> dict:
    """One folder -> ``out/shard-000000.tar ...`` + ``out/shards.json``, in ``ImageFolderDataset``'s order (every
    image file under ``src``, sorted); files in a class folder get its index in ``classes`` (default: ``src``'s
    own class folders, numbered as a labeled ``ImageFolderDataset`` numbers them)."""
    import webdataset as wds

    files, skipped = list_image_files(src)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {src}")
    own = class_folders(src)
    if classes is not None:
        unknown = sorted(set(own) - set(classes))
        if unknown:
            raise ValueError(f"{src} has classes that train/ does not: {', '.join(unknown[:5])}")
    classes = list(classes) if classes is not None else own
    index = {c: i for i, c in enumerate(classes)}
    out.mkdir(parents=True)
    counts: list[int] = []
    with wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for k, f in enumerate(files):
            rel = f.relative_to(src)
            sample = {"__key__": f"{k:08d}", f.suffix.lower().lstrip("."): f.read_bytes(), "path": rel.as_posix()}
            if len(rel.parts) > 1 and rel.parts[0] in index:
                sample["cls"] = index[rel.parts[0]]
            sink.write(sample)
            if k % shard_size == 0:
                counts.append(0)
            counts[-1] += 1
    for i in range(len(counts)):  # the member index beside each tar: readers skip scanning the headers
        shard = out / (SHARD_PATTERN % i)
        index_suffix(shard).write_text(json.dumps({"bytes": shard.stat().st_size, "samples": _scan_tar(shard)}))
    manifest = {"format": "webdataset", "writer": "maskconv shards", "version": 1, "source": str(src.resolve()),
                "classes": classes, "samples": len(files), "shard_size": shard_size,
                "shards": [{"file": SHARD_PATTERN % i, "samples": n} for i, n in enumerate(counts)],
                "skipped": [list(u) for u in skipped]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _arguments(p) -> None:
    p.add_argument("--data", required=True, help="image folder (class sub-folders keep their label; train/ + val/ "
                                                 "become out/train and out/val)")
    p.add_argument("--out", required=True, help="new folder for the shards (shard-000000.tar ... + shards.json)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")


def _cli(args) -> None:
    m = write_shards(args.data, args.out, args.shard_size)
    parts = m["splits"].items() if "splits" in m else [(None, m)]
    for split, s in parts:
        where = Path(args.out) / split if split else Path(args.out)
        skipped = f"; {len(s['skipped'])} non-regular file(s) skipped" if s["skipped"] else ""
        print(f"wrote {s['samples']} images in {len(s['shards'])} shard(s) to {where} "
              f"({len(s['classes'])} classes){skipped}")
    print(f"train on them with data.path=shards:{args.out}")


COMMAND = Command("write an image folder as WebDataset tar shards (train on them with data.path=shards:DIR)",
                  _arguments, _cli)
