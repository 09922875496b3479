"""Image folders with awkward files; samplers; named datasets."""
import numpy as np
import pytest
import torch
from PIL import Image

from maskconv.config import DataCfg
from maskconv.data.build import build_dataset, build_transform, labels_subset
from maskconv.data.datasets import (ImageFolderDataset, ImageTooLarge, NotRegularFile, ResumableSampler, SeededDataset,
                                    SyntheticImages, Unreadable, collate_skip, decode_image, find_fashion_mnist)


@pytest.fixture
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / "nested" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (32, 48, 4), dtype=np.uint8), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "nested" / "deeper" / "g16.png")
    Image.fromarray(rng.integers(0, 255, (25, 35), dtype=np.uint8)).save(root / "gray.bmp")
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    good = root / "rgb.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "notes.txt").write_text("not an image: ignored by suffix")
    return root


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_folder_converts_modes_and_skips_broken_files(messy_folder, in_chans):
    ds = ImageFolderDataset(messy_folder, in_chans=in_chans)
    assert len(ds) == 8  # .txt ignored
    items = {ds.samples[i][0].name: ds[i] for i in range(len(ds))}
    for bad in ("zero.png", "corrupt.jpg", "truncated.png"):
        assert isinstance(items[bad], Unreadable) and items[bad].path.endswith(bad)
    for good in ("rgb.png", "rgba.png", "cmyk.jpg", "g16.png", "gray.bmp"):
        img, label = items[good]
        assert img.dtype == torch.uint8 and img.shape[0] == in_chans and label == -1
    g16 = items["g16.png"][0]
    assert g16.max() > 128  # 16-bit scaled to 8-bit, not clipped to 255 nor left at 0..1
    ident = SeededDataset(ds, lambda t: t[:, :8, :8], replace_bad=False)  # eval: undecodable files dropped
    imgs, labels, skipped = collate_skip([ident[i] for i in range(len(ds))])
    names = sorted(p.rsplit("/", 1)[1] for p in skipped)
    assert imgs.shape == (5, in_chans, 8, 8) and labels.tolist() == [-1] * 5
    assert names == ["corrupt.jpg", "truncated.png", "zero.png"]
    train = SeededDataset(ds, lambda t: t[:, :8, :8])  # training: replaced by a neighbour, batches stay full
    imgs, labels, skipped = collate_skip([train[i] for i in range(len(ds))])
    # files, not attempts: two adjacent broken files are met three times here, but are two files
    assert imgs.shape[0] == 8 and sorted(p.rsplit("/", 1)[1] for p in skipped) == names


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        build_dataset(DataCfg(path=str(tmp_path / "nope")), 3)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat", labeled=True)


def test_labeled_folder_train_val(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = DataCfg(path=str(tmp_path), img_size=16)
    tr, va = build_dataset(cfg, 3, "train"), build_dataset(cfg, 3, "val")
    assert tr.classes == ["cat", "dog"] and len(tr) == 6 and len(va) == 6 and tr[4][1] == 1


def test_sampler_shards_global_batches_and_resumes():
    one = list(ResumableSampler(20, 4, seed=1, epoch=3, world=1))
    two = [list(ResumableSampler(20, 2, seed=1, epoch=3, rank=r, world=2)) for r in range(2)]
    # global batch k of 1 process == rank0's batch k + rank1's batch k
    for k in range(5):
        assert one[4 * k: 4 * k + 4] == two[0][2 * k: 2 * k + 2] + two[1][2 * k: 2 * k + 2]
    assert list(ResumableSampler(20, 4, seed=1, epoch=3, start_batch=2)) == one[8:]
    assert one != list(ResumableSampler(20, 4, seed=1, epoch=4))  # reshuffled every epoch
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableSampler(3, 4)


def test_seeded_augmentation_is_a_function_of_seed_epoch_index():
    cfg = DataCfg(img_size=32)
    tf = build_transform(cfg, 3, train=True)
    ds = SeededDataset(SyntheticImages(8, size=48), tf, seed=5)
    rng = torch.get_rng_state()
    (a, _), bad = ds[(3, 1)]
    assert torch.equal(rng, torch.get_rng_state())  # the run's own RNG (drop path) is left as it was
    assert bad == () and torch.equal(a, ds[(3, 1)][0][0])
    assert not torch.equal(a, ds[(3, 2)][0][0])
    # the stream is pinned: runs started by earlier versions resume onto the same augmentations
    torch.manual_seed(5 * 1_000_003 + 1 * 100_003 + 3)
    assert torch.equal(a, tf(SyntheticImages(8, size=48)[3][0]))


def test_labels_subset_per_class():
    sub = labels_subset(SyntheticImages(40, num_classes=4), 3)
    labels = [sub[i][1] for i in range(len(sub))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_fashion_mnist_when_installed():
    if find_fashion_mnist() is None:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            build_dataset(DataCfg(path="fashion-mnist"), 1)
        return
    ds = build_dataset(DataCfg(path="fashion-mnist"), 1, "val")
    img, label = ds[0]
    assert len(ds) == 10000 and img.shape == (1, 28, 28) and 0 <= label < 10


def test_non_regular_files_are_skipped_within_seconds(messy_folder, tmp_path):
    import os
    import time

    os.mkfifo(messy_folder / "pipe.png")  # opening it for reading would wait for a writer forever
    t0 = time.time()
    ds = ImageFolderDataset(messy_folder)
    assert [u.reason for u in ds.skipped] == ["FIFO"] and not any(p.name == "pipe.png" for p, _ in ds.samples)
    with pytest.raises(NotRegularFile, match="FIFO"):  # a path given directly (visualize, eval of one file)
        decode_image(messy_folder / "pipe.png", 3)
    assert time.time() - t0 < 10
    only = tmp_path / "only_pipe"
    only.mkdir()
    os.mkfifo(only / "a.jpg")
    with pytest.raises(ValueError, match=r"no image files .*a.jpg \(FIFO\)"):
        ImageFolderDataset(only)


def test_pixel_limit_skips_and_jpeg_decodes_reduced(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    assert decode_image(tmp_path / "big.png", 3).shape == (3, 400, 300)
    with pytest.raises(ImageTooLarge, match="300x400 = 120000 pixels, over data.max_pixels=100000"):
        decode_image(tmp_path / "big.png", 3, max_pixels=100_000)
    # JPEG: decoded at 1/2 scale (DCT reduction) since 150 px still covers min_side=100; then under the limit
    small = decode_image(tmp_path / "big.jpg", 3, max_pixels=100_000, min_side=100)
    assert small.shape == (3, 200, 150)
    assert decode_image(tmp_path / "big.jpg", 3, min_side=200).shape == (3, 400, 300)  # 1/2 would undercut 200
    ds = ImageFolderDataset(tmp_path, max_pixels=100_000, min_side=100)
    items = {p.name: ds[i] for i, (p, _) in enumerate(ds.samples)}
    assert items["big.png"].reason.endswith("over data.max_pixels=100000") and items["big.jpg"][0].shape[1] == 200


def test_load_images_reads_as_training_does(messy_folder, tmp_path):
    # One decoder: visualize's loader gives exactly what the validation pipeline gives for the same file,
    # so a 16-bit PNG is a picture, not solid white (PIL's convert('RGB') clips 16-bit values at 255).
    import os
    import time

    from maskconv.data import load_images

    ramp = (np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = load_images(tmp_path / "g16.png", 32, in_chans=3)
    cfg = DataCfg(path=str(tmp_path), img_size=32)
    ref = build_transform(cfg, 3, train=False)(ImageFolderDataset(tmp_path)[0][0])
    assert torch.equal(x[0], ref)
    assert x.std() > 0.5 and x.min() < -1.5  # a ramp from black to white (normalised), not all 255
    os.mkfifo(messy_folder / "aaa_pipe.png")  # sorted first: it would block the loader if it were opened
    t0 = time.time()
    imgs = load_images(messy_folder, 16, in_chans=3, limit=8)
    assert imgs.shape == (5, 3, 16, 16) and time.time() - t0 < 10
