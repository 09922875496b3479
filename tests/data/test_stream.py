"""Streamed training data (``wds:`` tar URLs, ``hf-stream:``): an epoch is a sample count cut into sub-streams by
rank and worker; every sample once per pass; a resumed epoch trains on exactly what the uninterrupted one did."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maskconv.config import DataCfg
from maskconv.data.build import build_dataset, build_transform
from maskconv.data.datasets import collate_skip

pytest.importorskip("webdataset")
from maskconv.data.shards import write_shards  # noqa: E402
from maskconv.data.stream import StreamDataset  # noqa: E402


def _folder(root, n=24, classes=("a", "b")):
    """``n`` small RGB PNGs spread over class folders; pixel (0, 0) of image i holds i (its identity)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 255, (20, 22, 3), dtype=np.uint8)
        a[0, 0] = i
        Image.fromarray(a).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "shards"
    write_shards(_folder(tmp_path / "imgs"), out, shard_size=3)  # 8 shards of 3
    return out


def _cfg(path, **kw):
    return DataCfg(path=str(path), img_size=16, crop_scale_min=0.5, **kw)


class _Ident:
    """A transform that keeps what identifies the image (pixel (0, 0)) beside a random draw (the seeded RNG)."""

    def __call__(self, img):
        return torch.stack([img[0, 0, 0].float(), torch.rand(())])


def _epoch(ds, epoch=1, rank=0, world=1, batch=2, start=0, workers=0, num_batches=None):
    """[(key, image id, random draw)] of one rank's epoch, through a DataLoader as the engine reads it."""
    nb = num_batches if num_batches is not None else len(ds) // (batch * world)
    it = ds.epoch_iterable(_Ident(), seed=5, epoch=epoch, rank=rank, world=world, batch=batch, num_batches=nb,
                           start_batch=start, num_workers=workers)
    out = []
    for items in DataLoader(it, batch_size=batch, num_workers=workers, collate_fn=list):
        for (sample, _bad), (key, e) in items:
            assert e == epoch
            out.append((key, int(sample[0][0]), float(sample[0][1])))
    return out


def test_one_epoch_reads_every_sample_once_and_orders_by_seed(shards):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar", shuffle_buffer=4), 3, labeled=False)
    assert isinstance(ds, StreamDataset) and len(ds) == 24  # the .idx.json files give the count
    a = _epoch(ds)
    assert [k for k, _, _ in a] == list(range(24))  # keys are the positions an indexed source gives
    assert sorted(i for _, i, _ in a) == list(range(24))  # each image once
    assert [i for _, i, _ in a] != list(range(24))  # shuffled (shard order and buffer)
    assert _epoch(ds) == a  # deterministic for a seed and epoch
    assert [i for _, i, _ in _epoch(ds, epoch=2)] != [i for _, i, _ in a]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_trains_on_what_the_whole_epoch_did(shards, workers):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar", shuffle_buffer=5), 3, labeled=False)
    whole = _epoch(ds, workers=workers)
    assert sorted(i for _, i, _ in whole) == list(range(24))
    for start in (1, 3, 4):  # resumes that land on either worker's turn
        assert _epoch(ds, start=start, workers=workers) == whole[start * 2:], start


def test_ranks_split_the_stream_without_overlap(shards):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar"), 3, labeled=False)
    r0, r1 = _epoch(ds, rank=0, world=2), _epoch(ds, rank=1, world=2)
    assert len(r0) == len(r1) == 12
    assert sorted(k for k, _, _ in r0 + r1) == list(range(24))  # rank r takes its slice of each global batch
    assert sorted(i for _, i, _ in r0 + r1) == list(range(24))  # and its own shards: no image read twice


def test_fewer_shards_than_readers_still_split_the_stream(shards):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000001}}.tar", shuffle_buffer=2), 3, labeled=False)
    assert len(ds) == 6
    parts = [_epoch(ds, rank=r, world=3, batch=1, workers=2) for r in range(3)]  # 6 readers, 2 shards
    assert sorted(i for p in parts for _, i, _ in p) == sorted(i for _, i, _ in _epoch(ds, batch=1))
    assert _epoch(ds, rank=1, world=3, batch=1, workers=2, start=1) == parts[1][1:]


def test_an_epoch_longer_than_the_stream_starts_it_over(shards):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar", stream_length=40), 3, labeled=False)
    ids = [i for _, i, _ in _epoch(ds, batch=4)]
    assert len(ids) == 40 and sorted(ids[:24]) == list(range(24)) and len(set(ids[24:])) == 16


def test_labels_and_classes_come_from_the_shards(shards):
    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar"), 3, labeled=True)
    assert ds.classes == ["a", "b"]
    it = ds.epoch_iterable(build_transform(_cfg("x"), 3, train=True), seed=0, epoch=0, rank=0, world=1, batch=4,
                           num_batches=6)
    images, labels, bad = collate_skip([s for s, _ in it])
    assert images.shape == (24, 3, 16, 16) and not bad
    assert labels.tolist().count(0) == labels.tolist().count(1) == 12


def test_an_unreadable_sample_is_replaced_the_same_way_after_a_resume(tmp_path):
    root = _folder(tmp_path / "imgs", n=12, classes=("x",))
    (root / "x" / "005.png").write_bytes(b"not a png")
    write_shards(root, tmp_path / "s", shard_size=12)
    ds = build_dataset(_cfg(f"wds:{tmp_path}/s/shard-000000.tar", shuffle_buffer=1), 3, labeled=False)
    whole = _epoch(ds)
    ids = [i for _, i, _ in whole]
    assert ids.count(6) == 2 and 5 not in ids  # the broken file's slot holds the next image
    assert _epoch(ds, start=2) == whole[4:]  # batch 2 = positions 4, 5: the replacement is made again


def test_uneven_shards_are_said_and_the_source_pickles(shards):
    import pickle

    ds = build_dataset(_cfg(f"wds:{shards}/shard-{{000000..000007}}.tar"), 3, labeled=False)
    assert ds.uneven_note(2) is None and ds.uneven_note(4) is None and ds.uneven_note(16) is None
    assert "8 shards over 3 readers" in ds.uneven_note(3)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers under spawn / forkserver get a pickled copy
    assert _epoch(clone) == _epoch(ds)


def test_stream_errors_are_one_line(shards, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "t.tar").write_bytes((shards / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="set data.stream_length"):
        build_dataset(_cfg(f"wds:{tmp_path}/bare/t.tar"), 3, labeled=False)
    (tmp_path / "not_a_tar.tar").write_bytes(b"hello" * 200)
    broken = build_dataset(_cfg(f"wds:{tmp_path}/not_a_tar.tar", stream_length=4), 3, labeled=False)
    with pytest.raises(ValueError, match=r"not_a_tar.tar: not a readable tar shard") as e:
        broken.head(2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="training source only"):
        build_dataset(_cfg(f"wds:{shards}/shard-000000.tar"), 3, split="val", labeled=True)


def test_hugging_face_streaming_folder(tmp_path):
    pytest.importorskip("datasets")
    root = _folder(tmp_path / "hfimgs", n=12)
    ds = build_dataset(_cfg(f"hf-stream:{root}", stream_length=12), 3, labeled=True)
    assert ds.classes == ["a", "b"]
    a = _epoch(ds, batch=3)
    assert sorted(i for _, i, _ in a) == list(range(12)) and _epoch(ds, batch=3) == a
    assert _epoch(ds, batch=3, start=2) == a[6:]
    r0, r1 = _epoch(ds, batch=3, rank=0, world=2), _epoch(ds, batch=3, rank=1, world=2)
    assert sorted(i for _, i, _ in r0 + r1) == list(range(12))
    w2 = _epoch(ds, batch=3, workers=2)  # in DataLoader workers datasets would split the shards again: it must not
    assert sorted(i for _, i, _ in w2) == list(range(12)) and _epoch(ds, batch=3, workers=2, start=1) == w2[3:]


def test_hugging_face_stream_of_several_files_with_workers(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = _folder(tmp_path / "pq_imgs", n=12)
    files = sorted(root.rglob("*.png"))
    (tmp_path / "pq").mkdir()
    for k in range(3):  # 3 parquet files of 4 images: 3 shards
        part = files[k::3]
        rows = {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in part]}
        datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).to_parquet(
            str(tmp_path / "pq" / f"part{k}.parquet"))
    ds = build_dataset(_cfg(f"hf-stream:{tmp_path / 'pq'}", stream_length=12), 3, labeled=False)
    assert ds.source.num_shards == 3
    one = _epoch(ds, batch=2)
    assert sorted(i for _, i, _ in one) == list(range(12))
    got = _epoch(ds, batch=2, workers=3)  # a file per reader: every image once
    assert sorted(i for _, i, _ in got) == list(range(12)) and _epoch(ds, batch=2, workers=3, start=3) == got[6:]
    uneven = _epoch(ds, batch=2, workers=2)  # 3 files over 2 readers: said, and still exactly resumable
    assert "3 shards over 2 readers" in ds.uneven_note(2) and len(uneven) == 12
    assert _epoch(ds, batch=2, workers=2, start=3) == uneven[6:]


def _fit(data_path, out, seen, stop_at=None, workers=2, **data):
    """A tiny supervised run on a stream through the engine's one loop (``seen``: keys of every batch;
    ``stop_at``: SIGINT in that loss call, the loop saves at the step boundary and stops)."""
    import signal

    from maskconv.config import Config
    from maskconv.engine.loop import fit
    from tests.conftest import TinyProbe

    cfg = Config()
    cfg.data = _cfg(data_path, batch_size=2, num_workers=workers, shuffle_buffer=3, **data)
    cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup_epochs = 2, 1e-2, 0.5
    cfg.run.out, cfg.run.device, cfg.run.progress, cfg.run.seed, cfg.run.save_every_minutes = str(out), "cpu", False, 4, 0
    ds = build_dataset(cfg.data, 3, labeled=True)
    torch.manual_seed(0)

    def loss_fn(m, x, y, keys):
        # torch.rand: a draw from the global RNG (drop path, MixUp), which a resumed epoch must continue exactly
        seen.append((keys[1], keys[0].tolist(), x[:, 0, 0, 0].tolist(), float(torch.rand(()))))
        if stop_at is not None and len(seen) == stop_at:
            signal.raise_signal(signal.SIGINT)
        return torch.nn.functional.cross_entropy(m(x), y)

    res = fit(cfg, TinyProbe(2), ds, build_transform(cfg.data, 3, train=True), loss_fn, task="finetune", keyed_loss=True)
    res.run.release()
    return res.model.state_dict()


def test_kill_and_resume_on_a_stream_with_workers_equals_an_uninterrupted_run(shards, tmp_path):
    """Exact resume for a stream (module docstring of data/stream.py): stopped mid second epoch, resumed with
    the same process and worker count, the run trains on the same images with the same augmentations and ends
    with the same weights, bit for bit; another worker count is refused."""
    from maskconv.engine.loop import Interrupted
    from maskconv.engine.rundir import ConfigChanged

    src = f"wds:{shards}/shard-{{000000..000007}}.tar"
    ref_seen, seen = [], []
    ref = _fit(src, tmp_path / "ref", ref_seen, stream_length=20)  # 10 batches an epoch
    with pytest.raises(Interrupted):
        _fit(src, tmp_path / "run", seen, stop_at=13, stream_length=20)
    with pytest.raises(ConfigChanged, match="stream_readers"):
        _fit(src, tmp_path / "run", [], workers=1, stream_length=20)
    resumed = _fit(src, tmp_path / "run", seen, stream_length=20)
    assert seen == ref_seen and len(seen) == 20  # the same images, keys and augmentations; none lost or repeated
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
