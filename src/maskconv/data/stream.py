"""Streamed training data: WebDataset tar URLs (``data.path=wds:<urls>``, any URL ``webdataset.gopen`` opens:
local files, ``pipe:`` commands, http) and Hugging Face streaming datasets (``data.path=hf-stream:<path or
name>``, ``datasets.load_dataset(..., streaming=True)``). Neither can be read by index, so they do not go through
``ResumableSampler``; ``StreamDataset.epoch_iterable`` makes one epoch's items in the same form the indexed
sources give the engine (``((sample, unreadable records), (key, epoch))``).

What an epoch and exact resume mean for a stream (docs/DECISIONS.md, "Streams"):

- An epoch is ``data.stream_length`` samples (the stream's size when the source knows it), split into global
  batches of ``batch * world`` like any source. The stream is cut into ``world * W`` sub-streams (``W`` =
  DataLoader workers, at least 1): WebDataset shards in an epoch-seeded order, shard ``k`` to sub-stream
  ``k % (world * W)``; a Hugging Face stream by ``IterableDataset.shard``. Each sub-stream passes a shuffle buffer
  (``data.shuffle_buffer``) seeded by (seed, epoch, sub-stream) and starts over when it runs dry (an epoch is a
  sample count, not one pass: every rank runs the same number of steps, as WebDataset's ``with_epoch``).
- Rank ``r``'s batch ``b`` is the next ``batch`` samples of sub-stream ``r * W + b % W``; its per-sample key
  (augmentation seed, FCMAE mask) is ``b * batch * world + r * batch + i``, the position an indexed source gives
  it. So a run is deterministic for a seed, world size and worker count, and a resumed run — which re-reads each
  sub-stream from the epoch's start and skips the samples its consumed batches took, undecoded — trains on
  exactly what the uninterrupted run would have. A resume with another world size or worker count would cut
  other sub-streams: it is refused (``StreamDataset.readers`` is recorded with the run's settings).
- With a number of shards that is a multiple of ``world * W`` (of equal size), an epoch of the stream's size
  sees every sample once; otherwise the readers with a shard more run dry later, an epoch repeats some samples
  and leaves others out, and the run says so when it starts (``uneven_note``).
- Each reader reads only its own sub-stream: the shards of a WebDataset (the data files of a Hugging Face stream)
  are split over ranks and workers. A source with fewer shards than readers is read whole by each reader, which
  keeps every ``world * W``-th sample (correct, but ``world * W`` times the reading: write more shards).
"""
from __future__ import annotations

import io
import random
import tarfile
from collections import deque
from itertools import islice
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import Unreadable, decode_stream, seeded_apply, unreadable_reason
from .photos import IMAGE_SUFFIXES

WDS, HF_STREAM = "wds:", "hf-stream:"


def is_stream(path: str) -> bool:
    return str(path).startswith((WDS, HF_STREAM))


@dataclass
class RawSample:
    """One undecoded sample of a stream: the image file's bytes, its label (-1: none) and a name for messages."""
    data: bytes
    label: int
    name: str


def _local(url: str) -> bool:
    """Whether a WebDataset URL names a local file (not http(s)://, s3://, ``pipe:`` ...)."""
    return "://" not in url and not url.startswith("pipe:")


class _WdsSource:
    """WebDataset tars at ``urls`` (brace patterns expanded as webdataset does), read in order with webdataset's
    own tar reader (``tarfile_samples``: ``gopen``, members grouped by key)."""

    def __init__(self, spec: str):
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise ImportError(f"data.path={spec} needs the webdataset package: pip install 'maskconv[shards]'") from None
        self.urls = list(expand_urls(spec[len(WDS):]))
        if not self.urls:
            raise ValueError(f"data.path={spec} names no shards")
        self.classes = self._manifest_classes()

    def _manifest_classes(self) -> list[str] | None:
        """The class names of ``shards.json`` beside local tars (``maskconv shards`` writes it), else None."""
        from pathlib import Path

        from .shards import read_manifest

        first = self.urls[0]
        if not _local(first) or not Path(first).is_file():
            return None
        return read_manifest(Path(first).parent).get("classes")

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def known_length(self) -> int | None:
        """Samples in all shards when every tar is local and has the ``.idx.json`` that ``write_shards`` leaves."""
        import json
        from pathlib import Path

        from .shards import index_suffix

        total = 0
        for u in self.urls:
            side = index_suffix(Path(u))
            if not _local(u) or not side.is_file():
                return None
            try:
                total += len(json.loads(side.read_text())["samples"])
            except (ValueError, KeyError, TypeError):
                return None
        return total

    def substream(self, epoch: int, seed: int, sub: int, num_subs: int, rnd: int) -> Iterator[RawSample]:
        """Pass ``rnd`` over sub-stream ``sub`` of ``num_subs``: shards ``order[sub::num_subs]`` of a shard order
        drawn from (seed, epoch, pass), read in turn."""
        from webdataset.tariterators import tarfile_samples

        g = torch.Generator().manual_seed(seed * 7919 + epoch * 131 + rnd)
        order = torch.randperm(len(self.urls), generator=g).tolist()
        urls = [self.urls[k] for k in order[sub::num_subs]]
        for s in _named_errors(tarfile_samples({"url": u} for u in urls), urls):
            image = next((k for k in s if isinstance(k, str) and "." + k.rsplit(".", 1)[-1].lower()
                          in IMAGE_SUFFIXES), None)
            if image is None:
                continue
            label = -1
            if "cls" in s:
                try:
                    label = int(bytes(s["cls"]).decode("ascii", "replace").strip())
                except ValueError:
                    raise ValueError(f"{s.get('__url__')}: {s['__key__']}.cls is not a class index") from None
            yield RawSample(bytes(s[image]), label, f"{s.get('__url__')}:{s['__key__']}.{image}")


def _named_errors(samples: Iterator[dict], urls: list[str]) -> Iterator[dict]:
    """webdataset's samples, with a tar that cannot be read (not a tar, truncated, a failed ``pipe:``) as one
    ``ValueError`` line naming it (webdataset tags its errors with the URL)."""
    it = iter(samples)
    while True:
        try:
            s = next(it)
        except StopIteration:
            return
        except (tarfile.TarError, OSError, ValueError) as e:
            name = next((u for u in urls if u in str(e)), urls[0] if len(urls) == 1 else f"one of {len(urls)} shards")
            raise ValueError(f"{name}: not a readable tar shard ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
        yield s


class _HFStreamSource:
    """A Hugging Face streaming ``IterableDataset`` (``load_dataset(path, split=..., streaming=True)``); the image
    column is read undecoded (file bytes) and decoded by ``decode_stream`` as every other source."""

    def __init__(self, spec: str, split: str = "train"):
        try:
            import datasets
        except ImportError:
            raise ImportError(f"data.path={spec} needs the datasets package: pip install 'maskconv[hf]'") from None
        path = spec[len(HF_STREAM):]
        if not path:
            raise ValueError("data.path=hf-stream: names no dataset: hf-stream:<folder or dataset name>")
        ds = datasets.load_dataset(path, split=split, streaming=True)
        feats = ds.features or {}
        self.image_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        if self.image_col is None:
            raise ValueError(f"data.path={spec}: the stream has no Image column (columns: {', '.join(feats)})")
        self.label_col = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        self.classes = list(feats[self.label_col].names) if self.label_col else None
        self.ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
        self.spec = spec
        info = getattr(ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        self._length = splits[split].num_examples if split in splits else None

    @property
    def num_shards(self) -> int:
        return self.ds.num_shards

    def known_length(self) -> int | None:
        return self._length or None

    def substream(self, epoch: int, seed: int, sub: int, num_subs: int, rnd: int) -> Iterator[RawSample]:
        """Pass ``rnd`` over part ``sub`` of ``num_subs`` (``IterableDataset.shard``), its data files in an order
        drawn from (seed, epoch, pass)."""
        part = self.ds.shard(num_shards=num_subs, index=sub)
        if part.num_shards > 1:
            part = part.shuffle(seed=seed, buffer_size=1)  # buffer 1: only the file order; the buffer is ours
            part.set_epoch(epoch * 1000 + rnd)
        # ``iter`` (not ``for row in part``): inside a DataLoader worker a datasets.IterableDataset would split its
        # shards again by worker id, on top of this reader's own cut
        rows = (row for batch in part.iter(batch_size=1) for row in _unbatch(batch))
        for k, row in enumerate(rows):
            cell = row[self.image_col]
            name = cell.get("path") or f"{self.spec} part {sub} row {k}"
            label = int(row[self.label_col]) if self.label_col else -1
            if cell.get("bytes") is None:
                with open(cell["path"], "rb") as f:
                    cell = {"bytes": f.read()}
            yield RawSample(cell["bytes"], label, name)


def _unbatch(batch: dict) -> Iterator[dict]:
    """A ``{column: [values]}`` batch of ``IterableDataset.iter`` as rows."""
    cols = list(batch)
    return (dict(zip(cols, vals)) for vals in zip(*(batch[c] for c in cols)))


def _shuffled(items: Iterator[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """A shuffle buffer of ``size`` (1 = stream order): fill, then emit a random slot and refill it."""
    if size <= 1:
        yield from items
        return
    buf: list[RawSample] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)  # the pass's end: the buffer empties
    yield from buf


class StreamDataset:
    """A streamed training set of ``length`` samples an epoch (see the module docstring). Not indexable: the
    engine asks ``epoch_iterable`` for each epoch's items."""

    def __init__(self, spec: str, in_chans: int = 3, labeled: bool = False, length: int = 0,
                 shuffle_buffer: int = 1000, classes: list[str] | None = None, max_pixels: int = 0,
                 min_side: int = 0, keep_16bit: bool = False):
        self.source = _WdsSource(spec) if spec.startswith(WDS) else _HFStreamSource(spec)
        self.spec, self.in_chans, self.shuffle_buffer = spec, in_chans, shuffle_buffer
        self.decode = dict(max_pixels=max_pixels, min_side=min_side, keep_16bit=keep_16bit)
        known = self.source.known_length()
        if length <= 0 and known is None:
            raise ValueError(f"data.path={spec}: the stream does not say how many samples it holds; set "
                             "data.stream_length (samples per epoch)")
        self.length = length if length > 0 else known
        self.classes: list[str] = []
        if labeled:
            own = self.source.classes
            if not own:
                raise ValueError(f"data.path={spec}: no class names for the stream's labels (a shards.json beside "
                                 "local tars, or a ClassLabel column): use it for pretraining")
            if classes is not None and list(classes) != list(own):
                raise ValueError(f"data.path={spec}: the stream's classes differ from the run's")
            self.classes = list(own)

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        return f"stream {self.spec}, {self.length} samples an epoch"

    def uneven_note(self, readers: int) -> str | None:
        """A note when ``readers`` sub-streams get unequal shares of the shards: the ones with a shard more run dry
        later, so an epoch of the stream's size repeats some samples and leaves others out."""
        n = self.source.num_shards
        if n < readers or n % readers == 0:
            return None  # fewer shards than readers: every reader reads the whole stream (even by construction)
        return (f"{self.spec}: {n} shards over {readers} readers (processes x workers) do not divide evenly: an "
                f"epoch repeats some samples and leaves others out; write a multiple of {readers} equal shards for "
                "every sample once an epoch")

    def readers(self, world: int, num_workers: int) -> str:
        """The sub-stream cut, which a resume must match (the engine records it with the run's resolved
        settings, where a change is refused)."""
        return f"{world} process(es) x {max(1, num_workers)} reader(s)"

    def raw_substream(self, epoch: int, seed: int, sub: int, num_subs: int) -> Iterator[RawSample]:
        """Sub-stream ``sub``, pass after pass, each pass through a shuffle buffer seeded by (seed, epoch,
        sub-stream, pass) and emptied at the pass's end: every sample once per pass."""
        rnd = 0
        while True:
            rng = random.Random(((seed * 1_000_003 + epoch) * 7919 + sub) * 131 + rnd)
            if self.source.num_shards >= num_subs:  # this reader's own shards only
                part = self.source.substream(epoch, seed, sub, num_subs, rnd)
            else:  # fewer shards than readers: each reads the whole stream and keeps every num_subs-th sample
                part = islice(self.source.substream(epoch, seed, 0, 1, rnd), sub, None, num_subs)
            n = 0
            for x in _shuffled(part, self.shuffle_buffer, rng):
                n += 1
                yield x
            if n == 0:
                raise ValueError(f"{self.spec}: sub-stream {sub} of {num_subs} holds no image samples")
            rnd += 1

    def head(self, n: int) -> list:
        """The stream's first ``n`` samples in file order, decoded (``Unreadable`` where they cannot be)."""
        return [self.decode_sample(x) for x in islice(self.source.substream(0, 0, 0, 1, 0), n)]

    def decode_sample(self, raw: RawSample):
        """``(image uint8 (C, H, W), label)`` or ``Unreadable``."""
        try:
            img = decode_stream(io.BytesIO(raw.data), self.in_chans, **self.decode)
        except Exception as e:
            return Unreadable(raw.name, unreadable_reason(e))
        return img, raw.label

    def epoch_iterable(self, transform, seed: int, epoch: int, rank: int, world: int, batch: int,
                       num_batches: int, start_batch: int = 0, num_workers: int = 0) -> IterableDataset:
        return _StreamEpoch(self, transform, seed, epoch, rank, world, batch, num_batches, start_batch,
                            max(1, num_workers))


class _StreamEpoch(IterableDataset):
    """One epoch of one rank: worker ``w`` yields batches ``start + w, start + w + W, ...`` item by item, which
    is the order a DataLoader's round-robin over its workers returns them in."""

    def __init__(self, ds: StreamDataset, transform: Callable, seed: int, epoch: int, rank: int, world: int,
                 batch: int, num_batches: int, start_batch: int, workers: int):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, seed, epoch
        self.rank, self.world, self.batch, self.workers = rank, world, batch, workers
        self.num_batches, self.start_batch = num_batches, start_batch

    def __iter__(self):
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.workers:
            raise RuntimeError(f"a stream epoch cut for {self.workers} reader(s) runs in {n_workers}")
        W, B, s = self.workers, self.batch, self.start_batch
        by_sub: dict[int, _Peekable] = {}
        for b in range(s + w, self.num_batches, W):
            j = b % W
            if j not in by_sub:  # re-read from the epoch's start, skipping what batches before ``s`` took
                it = _Peekable(self.ds.raw_substream(self.epoch, self.seed, self.rank * W + j, self.world * W))
                for _ in range(len(range(j, s, W)) * B):
                    it.next()
                by_sub[j] = it
            it = by_sub[j]
            for i in range(B):
                bad: list[Unreadable] = []
                sample = self.ds.decode_sample(it.next())
                ahead = 0
                while isinstance(sample, Unreadable):
                    # the next readable sample of the stream fills the slot, read ahead without being consumed:
                    # which sample that is depends on the stream alone, so a resumed run fills it the same way
                    bad.append(sample)
                    if len(bad) > 32:
                        raise ValueError(f"{len(bad)} consecutive samples from {bad[0].path} cannot be read "
                                         f"({bad[0].reason}): is this an image stream?")
                    sample = self.ds.decode_sample(it.peek(ahead))
                    ahead += 1
                key = b * B * self.world + self.rank * B + i
                yield (seeded_apply(self.transform, sample, self.seed, self.epoch, key), tuple(bad)), \
                    (key, self.epoch)


class _Peekable:
    """An iterator with read-ahead: ``peek(k)`` is the (k+1)-th next item, left to be returned by ``next``."""

    def __init__(self, it: Iterator):
        self.it, self.ahead = it, deque()

    def next(self):
        return self.ahead.popleft() if self.ahead else next(self.it)

    def peek(self, k: int):
        while len(self.ahead) <= k:
            self.ahead.append(next(self.it))
        return self.ahead[k]
