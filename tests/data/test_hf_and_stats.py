"""Hugging Face ``datasets`` folders as a source (same images and labels as the folder they hold), and
``channel_stats`` (the numbers ``maskconv data stats`` prints) against numpy over every pixel."""
import numpy as np
import pytest
import torch
from PIL import Image

from maskconv.config import DataCfg
from maskconv.data.build import build_dataset
from maskconv.data.datasets import ImageFolderDataset
from maskconv.data.stats import channel_stats


def _folder(root, classes=("cat", "dog"), n=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(12, 20, 2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _to_hf(folder: ImageFolderDataset):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    return datasets.Dataset.from_dict({"image": [str(p) for p, _ in folder.samples],
                                       "label": [c for _, c in folder.samples]}, features=feats)


def test_hf_save_to_disk_folder_gives_the_folders_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = _folder(tmp_path / "src")
    train = ImageFolderDataset(src, labeled=True)
    _to_hf(train).save_to_disk(str(tmp_path / "flat"))
    cfg_h = DataCfg(path=f"hf:{tmp_path / 'flat'}", img_size=16)
    hf = build_dataset(cfg_h, 3, labeled=True)
    assert hf.classes == ["cat", "dog"] and hf.labels == train.labels == [0, 0, 0, 1, 1, 1]
    for i in range(len(train)):
        assert torch.equal(hf[i][0], train[i][0]) and hf[i][1] == train[i][1]
    assert len(build_dataset(cfg_h, 3, labeled=False)) == 6 and build_dataset(cfg_h, 3, labeled=False)[0][1] == -1
    # a DatasetDict with train + validation splits as a folder with train/ + val/; val numbered by train's classes
    val_src = _folder(tmp_path / "val", classes=("dog",), n=2, seed=1)
    val = ImageFolderDataset(val_src, labeled=True)
    v = _to_hf(val)
    datasets.DatasetDict({"train": _to_hf(train), "validation": v}).save_to_disk(str(tmp_path / "dd"))
    cfg_d = DataCfg(path=f"hf:{tmp_path / 'dd'}", img_size=16)
    assert build_dataset(cfg_d, 3, "val", classes=["cat", "dog"]).labels == [1, 1]
    with pytest.raises(ValueError, match="not trained on: dog"):
        build_dataset(cfg_d, 3, "val", classes=["cat", "eel"])
    assert build_dataset(cfg_h, 3).fingerprint() == build_dataset(cfg_h, 3).fingerprint()
    with pytest.raises(FileNotFoundError, match="not a folder written by save_to_disk"):
        build_dataset(DataCfg(path=f"hf:{tmp_path / 'nope'}"), 3)


def test_hf_keeps_16bit(tmp_path):
    datasets = pytest.importorskip("datasets")
    a = (np.arange(20 * 24, dtype=np.uint32) * 131 + 3).astype(np.uint16).reshape(20, 24)
    Image.fromarray(a).save(tmp_path / "g16.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "g16.png")]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "h16"))
    img, _ = build_dataset(DataCfg(path=f"hf:{tmp_path / 'h16'}", img_size=16), 1, labeled=False)[0]
    assert img.dtype == torch.uint16 and torch.equal(img[0].to(torch.int32), torch.from_numpy(a.astype(np.int32)))


def test_channel_stats_equal_numpy_over_every_pixel(tmp_path):
    src = _folder(tmp_path / "src", n=4)
    (src / "cat" / "broken.png").write_bytes(b"no")
    ds = ImageFolderDataset(src)
    st = channel_stats(ds)
    pix = np.concatenate([np.asarray(Image.open(p).convert("RGB"), np.float64).reshape(-1, 3) / 255
                          for p, _ in ds.samples if p.name != "broken.png"])
    assert st["images"] == 8 and st["unreadable"] == 1 and st["pixels"] == len(pix)
    np.testing.assert_allclose(st["mean"], pix.mean(0), atol=1e-6)
    np.testing.assert_allclose(st["std"], pix.std(0), atol=1e-6)
    assert channel_stats(ds, limit=2)["images"] == 2
    # 16-bit on its own scale: a constant 65535 image and a constant 0 image -> mean 0.5, std 0.5
    g = tmp_path / "g16"
    g.mkdir()
    for k, v in enumerate((0, 65535)):
        Image.fromarray(np.full((4, 4), v, np.uint16)).save(g / f"{k}.png")
    st16 = channel_stats(ImageFolderDataset(g, in_chans=1, keep_16bit=True))
    assert st16["mean"] == [0.5] and st16["std"] == [0.5]


def test_shards_and_data_stats_commands(tmp_path, capsys):
    import json

    pytest.importorskip("webdataset")
    from maskconv.cli import main

    src = _folder(tmp_path / "src")
    assert main(["shards", "--data", str(src), "--out", str(tmp_path / "sh"), "--shard-size", "4"]) == 0
    assert "wrote 6 images in 2 shard(s)" in capsys.readouterr().out
    assert main(["data", "stats", "--data", f"shards:{tmp_path / 'sh'}", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mean"] == channel_stats(ImageFolderDataset(src))["mean"] and printed["images"] == 6
    assert main(["shards", "--data", str(src), "--out", str(tmp_path / "sh")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_data_mean_std_set_the_normalisation_and_the_export_spec():
    from torchvision.transforms import v2

    from maskconv.config import ConfigError, load_config, validate
    from maskconv.data.build import build_transform
    from maskconv.export.preprocess import preprocessing_spec

    cfg = load_config(None, ["data.mean=0.1,0.2,0.3", "data.std=0.5,0.5,0.25", "data.img_size=32"])
    assert cfg.data.mean == (0.1, 0.2, 0.3) and cfg.data.std == (0.5, 0.5, 0.25)
    for train in (True, False):
        norm = next(t for t in build_transform(cfg.data, 3, train=train).transforms if isinstance(t, v2.Normalize))
        assert list(norm.mean) == [0.1, 0.2, 0.3] and list(norm.std) == [0.5, 0.5, 0.25]
    spec = preprocessing_spec(cfg.data, 3)
    assert spec["mean"] == [0.1, 0.2, 0.3] and spec["std"] == [0.5, 0.5, 0.25]
    default = next(t for t in build_transform(load_config().data, 1, train=False).transforms
                   if isinstance(t, v2.Normalize))
    assert list(default.mean) == [0.5] and list(default.std) == [0.5]
    with pytest.raises(ValueError, match="data.mean has 3 values; the model takes 1 channel"):
        build_transform(cfg.data, 1, train=False)
    with pytest.raises(ConfigError, match="data.std=.*> 0 for every channel"):
        validate(load_config(None, ["data.std=0.5,0,0.5"]))
    with pytest.raises(ConfigError, match="data.mean: expected a number"):
        load_config(None, ["data.mean=0.1,x"])


def test_mean_std_of_the_wrong_length_is_refused_before_any_file(tmp_path, capsys):
    from maskconv.cli import main

    out = tmp_path / "r"
    assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(out), "model.in_chans=1",
                 "data.img_size=64", "data.mean=0.5,0.5,0.5", "data.std=0.2,0.2,0.2"]) == 2
    assert "data.mean has 3 values; the model takes 1 channel(s)" in capsys.readouterr().err and not out.exists()
