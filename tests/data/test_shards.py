"""WebDataset shards: written from a folder, read by index; the same images in the same order as the folder, by
rank, through DataLoader workers, and across an interrupted and resumed run; 16-bit grayscale kept lossless."""
import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maskconv.config import Config, DataCfg
from maskconv.data.build import build_dataset, build_transform
from maskconv.data.datasets import ResumableSampler, SeededDataset, Unreadable, collate_skip

pytest.importorskip("webdataset")
from maskconv.data.shards import ShardDataset, _scan_tar, shard_splits, tar_index, write_shards  # noqa: E402
from tests.conftest import TinyProbe


def _image(rng, path, mode):
    h, w = rng.integers(18, 30, 2)
    if mode == "L":
        a = rng.integers(0, 255, (h, w), dtype=np.uint8)
    elif mode == "I;16":
        a = rng.integers(0, 65535, (h, w), dtype=np.uint16)
    else:
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture
def labeled_folder(tmp_path):
    """3 classes ('a', 'a-b', 'b': a name that sorts differently as a string and as path parts), a nested
    sub-folder, PNG + JPEG, RGB + gray, one broken file, 11 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c, n in (("a", 4), ("a-b", 3), ("b", 3)):
        (root / c / "sub").mkdir(parents=True)
        for i in range(n):
            where = root / c / ("sub" if i == 0 else "") / f"img{i}.{'jpg' if i % 2 else 'png'}"
            _image(rng, where, "L" if i == 2 else "RGB")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    return root


def _cfg(path, **kw):
    return DataCfg(path=str(path), img_size=16, crop_scale_min=0.5, **kw)


def _items(ds, world, rank, seed=3, epoch=1, batch=2):
    """What rank ``rank`` of ``world`` trains on in ``epoch``: (index, label, augmented image) per sample."""
    sampler = ResumableSampler(len(ds), batch, seed, epoch, rank, world)
    seeded = SeededDataset(ds, build_transform(_cfg("x"), 3, train=True), seed)
    out = []
    for key in sampler:
        (img, label), bad = seeded[key]
        out.append((key[0], label, img, tuple(u.path.rsplit("/", 1)[-1] for u in bad)))
    return out


@pytest.mark.parametrize("labeled", [True, False])
def test_shards_give_the_folders_images_in_the_folders_order(labeled_folder, tmp_path, labeled):
    out = tmp_path / "shards"
    manifest = write_shards(labeled_folder, out, shard_size=4)
    assert manifest["samples"] == 11 and [s["samples"] for s in manifest["shards"]] == [4, 4, 3]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    folder = build_dataset(_cfg(labeled_folder), 3, labeled=labeled)
    shards = build_dataset(_cfg(f"shards:{out}"), 3, labeled=labeled)
    assert isinstance(shards, ShardDataset) and len(shards) == len(folder) == 11
    assert shards.labels == folder.labels and shards.classes == folder.classes
    if labeled:
        assert shards.classes == ["a", "a-b", "b"] and shards.labels == [0] * 4 + [1] * 3 + [2] * 4
    for world in (1, 2):
        for rank in range(world):
            a, b = _items(folder, world, rank), _items(shards, world, rank)
            assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == {1: 10, 2: 4}[world]  # drop_last
            for x, y in zip(a, b):
                assert torch.equal(x[2], y[2]), x[0]
                assert x[3] == y[3]  # the broken file is met (and replaced) at the same place
    # the broken file is named by shard and member, with the folder's reason
    i = next(k for k in range(len(folder)) if isinstance(folder[k], Unreadable))
    assert isinstance(shards[i], Unreadable) and shards[i].reason == folder[i].reason
    assert shards[i].path == f"{out / 'shard-000001.tar'}:b/broken.png"


def test_dataloader_workers_and_other_shard_specs_read_the_same(labeled_folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(labeled_folder, out, shard_size=4)
    folder = build_dataset(_cfg(labeled_folder), 3, labeled=True)
    ref = ShardDataset(sorted(out.glob("*.tar")), 3, labeled=True)
    for spec in (f"shards:{out}/shard-{{000000..000002}}.tar", f"shards:{out}"):
        assert build_dataset(_cfg(spec), 3, labeled=True).fingerprint() == ref.fingerprint()
    for idx in out.glob("*.idx.json"):  # the index beside each tar is what a scan of the tar finds
        shard = out / idx.name[:-len(".idx.json")]
        assert [tuple(tuple(x) if isinstance(x, list) else x for x in r) for r in tar_index(shard)] == _scan_tar(shard)
        idx.write_text('{"bytes": 1, "samples": []}')  # stale (not the tar's size): ignored, the tar is scanned
    assert ShardDataset(sorted(out.glob("*.tar")), 3, labeled=True).fingerprint() == ref.fingerprint()
    capped = ShardDataset(sorted(out.glob("*.tar")), 3, labeled=True)
    capped.MAX_OPEN = 2  # 3 shards, 2 descriptors: the least recently used shard is closed and reopened
    for i in (0, 5, 9, 0, 9, 5):
        assert torch.equal(capped[i][0], ref[i][0]) and len(capped._fds) <= 2
    one = ShardDataset(shard_splits(f"shards:{out}/shard-000001.tar")[None], 3, labeled=True)
    assert len(one) == 4 and one.labels == [1, 1, 1, 2]  # samples 4..7: the 3 of a-b, then b/broken.png
    tf = build_transform(_cfg("x"), 3, train=True)
    batches = []
    for ds, workers in ((folder, 0), (ref, 2)):  # workers: forked processes read through the inherited descriptors
        sampler = ResumableSampler(len(ds), 2, seed=1, epoch=0)
        loader = DataLoader(SeededDataset(ds, tf, 1), batch_size=2, sampler=sampler, num_workers=workers,
                            collate_fn=collate_skip)
        batches.append([(x, y) for x, y, _ in loader])
    assert len(batches[0]) == len(batches[1]) == 5
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_train_val_splits_number_val_by_train_classes(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for split, classes in (("train", ("cat", "dog", "eel")), ("val", ("dog", "eel"))):
        for c in classes:
            (src / split / c).mkdir(parents=True)
            for i in range(2):
                _image(rng, src / split / c / f"{i}.png", "RGB")
    out = tmp_path / "shards"
    manifest = write_shards(src, out, shard_size=100)
    assert set(manifest["splits"]) == {"train", "val"} and (out / "val" / "shards.json").is_file()
    cfg_f, cfg_s = _cfg(src), _cfg(f"shards:{out}")
    train_f, train_s = build_dataset(cfg_f, 3), build_dataset(cfg_s, 3)
    assert train_s.classes == train_f.classes == ["cat", "dog", "eel"]
    val_f = build_dataset(cfg_f, 3, "val", classes=train_f.classes)
    val_s = build_dataset(cfg_s, 3, "val", classes=train_s.classes)
    assert val_s.labels == val_f.labels == [1, 1, 2, 2]
    assert json.loads((out / "val" / "shards.json").read_text())["classes"] == ["cat", "dog", "eel"]
    with pytest.raises(ValueError, match="not trained on: dog"):
        ShardDataset(sorted((out / "val").glob("*.tar")), 3, labeled=True, classes=["cat", "eel"])


def test_bad_shard_sources_are_one_line_errors(labeled_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard-000000.tar not found \(and 9 more\)"):
        shard_splits(f"shards:{tmp_path}/shard-{{000000..000009}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in"):
        build_dataset(_cfg(f"shards:{tmp_path / 'empty'}"), 3)
    out = tmp_path / "shards"
    write_shards(labeled_folder, out)
    with pytest.raises(ValueError, match="not an empty folder"):
        write_shards(labeled_folder, out)
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        build_dataset(_cfg(f"shards:{out}"), 3, "val")
    flat = tmp_path / "flat"
    flat.mkdir()
    _image(np.random.default_rng(0), flat / "x.png", "RGB")
    write_shards(flat, tmp_path / "flat_shards")
    with pytest.raises(ValueError, match="hold no labels"):
        build_dataset(_cfg(f"shards:{tmp_path / 'flat_shards'}"), 3, labeled=True)
    assert len(build_dataset(_cfg(f"shards:{tmp_path / 'flat_shards'}"), 3, labeled=False)) == 1


def test_16bit_png_values_survive_to_the_tensor(tmp_path):
    root = tmp_path / "x16"
    root.mkdir()
    a = (np.arange(24 * 32, dtype=np.uint32) * 85 + 7).astype(np.uint16).reshape(24, 32)  # 768 values > 255
    Image.fromarray(a).save(root / "g16.png")
    assert Image.open(root / "g16.png").mode.startswith("I;16")
    write_shards(root, tmp_path / "s16")
    for path in (root, f"shards:{tmp_path / 's16'}"):
        img, _ = build_dataset(_cfg(path), 1, labeled=False)[0]
        assert img.dtype == torch.uint16 and torch.equal(img[0].to(torch.int32), torch.from_numpy(a.astype(np.int32)))
        from torchvision.transforms import v2

        x = v2.ToDtype(torch.float32, scale=True)(img)  # the transforms' own float step: v / 65535, injective
        assert torch.equal((x[0].double() * 65535).round().to(torch.int32), torch.from_numpy(a.astype(np.int32)))
        assert build_dataset(_cfg(path), 3, labeled=False)[0][0].dtype == torch.uint8  # RGB models: 8-bit as before



def _fit(data_path, out, seen, stop_at=None):
    """A tiny supervised run through the engine's one loop; ``seen`` records the global indices of every batch;
    ``stop_at``: raise SIGINT in that loss call (the loop saves at the step boundary and stops)."""
    from maskconv.engine.loop import fit

    cfg = Config()
    cfg.data = _cfg(data_path, batch_size=2, num_workers=0)
    cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup_epochs = 2, 1e-2, 0.5
    cfg.run.out, cfg.run.device, cfg.run.progress, cfg.run.seed, cfg.run.save_every_minutes = str(out), "cpu", False, 4, 0
    ds = build_dataset(cfg.data, 3, labeled=True)
    torch.manual_seed(0)
    model = TinyProbe(3)

    def loss_fn(m, x, y, keys):
        seen.append((keys[1], keys[0].tolist()))
        if stop_at is not None and len(seen) == stop_at:
            signal.raise_signal(signal.SIGINT)
        return torch.nn.functional.cross_entropy(m(x), y)

    res = fit(cfg, model, ds, build_transform(cfg.data, 3, train=True), loss_fn, task="finetune", keyed_loss=True)
    res.run.release()
    return res.model.state_dict()


def test_resume_on_shards_is_exact_and_equals_the_folder(labeled_folder, tmp_path):
    """Exact resume for shards means what it means for a folder: the run stops at a step boundary, and the resumed
    run skips exactly the batches it had consumed (same epoch permutation, same per-sample seeds), so it ends
    with the same weights, bit for bit, as an uninterrupted run -- and as the same run on the folder."""
    from maskconv.engine.loop import Interrupted

    shards = tmp_path / "shards"
    write_shards(labeled_folder, shards, shard_size=3)
    ref_seen, folder_seen, seen = [], [], []
    ref = _fit(f"shards:{shards}", tmp_path / "ref", ref_seen)
    on_folder = _fit(labeled_folder, tmp_path / "folder", folder_seen)
    with pytest.raises(Interrupted):
        _fit(f"shards:{shards}", tmp_path / "run", seen, stop_at=7)  # mid second epoch (5 batches an epoch)
    assert len(seen) == 7
    resumed = _fit(f"shards:{shards}", tmp_path / "run", seen)
    assert seen == ref_seen == folder_seen and len(seen) == 10  # every batch once, none repeated or lost
    for k in ref:
        assert torch.equal(ref[k], resumed[k]) and torch.equal(ref[k], on_folder[k]), k


def _pngs(root, n=16, size=32, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + i % 5, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


PRE = ["pretrain", "--model", "test_convnextv2", "data.img_size=64", "data.batch_size=4", "run.progress=false",
       "objective.decoder_dim=16", "optim.epochs=1", "optim.lr=1e-3", "optim.warmup_epochs=0", "run.log_every_steps=1"]


def test_pretraining_on_shards_trains_what_the_folder_trains(tmp_path, capsys):
    """The CLI end to end: FCMAE's masks are keyed by global index, so the same weights, bit for bit."""
    from safetensors.torch import load_file

    from maskconv.cli import main

    folder = _pngs(tmp_path / "imgs")
    write_shards(folder, tmp_path / "shards", shard_size=5)
    for name, data in (("f", str(folder)), ("s", f"shards:{tmp_path / 'shards'}")):
        assert main([*PRE, "--data", data, "data.num_workers=0", "--out", str(tmp_path / name)]) == 0
    a, b = load_file(tmp_path / "f" / "objective.safetensors"), load_file(tmp_path / "s" / "objective.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fp = json.loads((tmp_path / "s" / "config.json").read_text())["resolved"]["data_fingerprint"]
    assert fp.startswith("16 shard samples, sha256 ")


@pytest.mark.slow
def test_two_processes_with_workers_on_shards_equal_one_process_on_the_folder(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    folder = _pngs(tmp_path / "imgs")
    write_shards(folder, tmp_path / "shards", shard_size=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "maskconv", *PRE, "--data", str(folder), "data.num_workers=0",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "maskconv", *PRE, "--data", f"shards:{tmp_path / 'shards'}", "data.batch_size=2",
                          "data.num_workers=1", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-4000:]

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    assert len(losses("one")) == 4
    torch.testing.assert_close(torch.tensor(losses("two")), torch.tensor(losses("one")), rtol=1e-4, atol=1e-5)
