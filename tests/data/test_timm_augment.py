"""data.augment_lib=timm: the official fine-tuning augmentations (facebookresearch/ConvNeXt-V2 datasets.py
build_transform, main_finetune.py Mixup) are timm's, called as the official code calls them."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskconv.cli import main
from maskconv.config import ConfigError, load_config
from maskconv.data.build import TimmMixup, build_mixup, build_transform
from maskconv.data.datasets import SeededDataset, seeded
from tests.conftest import TinyProbe

timm = pytest.importorskip("timm")

SEEDS = range(24)  # enough draws that RandAugment's ops, both flips and RandomErasing all occur


def _image(h=240, w=300) -> torch.Tensor:
    """A uint8 (3, H, W) picture with structure (gradients, a block, noise), so every RandAugment op changes it."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, h, w, generator=g) * 40
    img[:, 60:140, 90:200] = torch.tensor([250.0, 30.0, 90.0])[:, None, None]
    return img.clamp(0, 255).to(torch.uint8)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, img):
        self.img = img

    def __len__(self):
        return len(SEEDS)

    def __getitem__(self, i):
        return self.img, 0


def _official_transform(**change):
    """main_finetune.py's train transform with its defaults (ConvNeXt-V2 argparse: --input_size 224,
    --color_jitter None, --aa rand-m9-mstd0.5-inc1, --train_interpolation bicubic, --reprob 0.25, --remode pixel,
    --recount 1, ImageNet default mean / std), built as datasets.build_transform builds it."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    args = dict(input_size=224, is_training=True, color_jitter=None, auto_augment="rand-m9-mstd0.5-inc1",
                interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD)
    return create_transform(**{**args, **change})


def _matches(ours, official) -> list[bool]:
    """Per seed: our transform through SeededDataset (the training path) == the official one on the PIL image
    with torch, ``random`` and NumPy seeded the same way (SeededDataset's seed for (seed 0, epoch 0, index i) is i)."""
    from PIL import Image

    img = _image()
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    ds = SeededDataset(_Repeat(img), ours, seed=0)
    out = []
    for i in SEEDS:
        (a, _), _ = ds[(i, 0)]
        random.seed(i)
        np.random.seed(i)
        torch.manual_seed(i)
        b = official(pil)
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == b.dtype == torch.float32
        out.append(torch.equal(a, b))
    return out


@pytest.mark.parametrize("recipe", ["convnextv2_atto_finetune", "convnextv2_tiny_finetune", "convnextv2_base_finetune"])
def test_official_recipe_train_transform_equals_timm_create_transform(recipe):
    cfg = load_config(recipe)
    assert all(_matches(build_transform(cfg.data, 3, train=True), _official_transform()))


def test_the_comparison_sees_a_different_erasing_fill_or_policy():
    cfg = load_config("convnextv2_tiny_finetune")
    ours = build_transform(cfg.data, 3, train=True)
    assert not all(_matches(ours, _official_transform(re_mode="const")))  # the zeros of 'const', not noise
    assert not all(_matches(ours, _official_transform(auto_augment="rand-m9-n3-mstd0.5-inc1")))
    cfg = load_config("convnextv2_tiny_finetune", ["data.remode=const"])  # and the other way round
    assert not all(_matches(build_transform(cfg.data, 3, train=True), _official_transform()))


def test_timm_pipeline_output_is_what_the_engine_takes_and_cifar_sizes_take_the_official_random_crop():
    cfg = load_config("convnextv2_tiny_finetune", ["data.img_size=32"])
    tf = build_transform(cfg.data, 3, train=True)
    assert type(tf.transforms[1].transforms[0]).__name__ == "RandomCrop"  # official: input_size <= 32
    gray = build_transform(load_config("convnextv2_tiny_finetune", ["data.img_size=64"]).data, 1, train=True)
    with seeded(3):
        x = gray(torch.randint(0, 65536, (1, 80, 70), dtype=torch.int32).to(torch.uint16))  # 16-bit grayscale
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="1- or 3-channel"):
        build_transform(cfg.data, 4, train=True)
    with pytest.raises(ValueError, match="data.auto_augment='rand-x9'"):
        build_transform(load_config("convnextv2_tiny_finetune", ["data.auto_augment=rand-x9"]).data, 3, train=True)


def test_posterize_keeps_pillows_bits_and_gives_the_old_black_image_at_zero_bits():
    from PIL import Image

    from maskconv.data.build import posterize

    a = _image(20, 30).permute(1, 2, 0).numpy()
    for mode, arr in (("RGB", a), ("L", a[..., 0])):
        img = Image.fromarray(arr, mode)
        for bits in range(0, 9):  # Pillow's LUT: keep the top ``bits`` bits (Pillow < 13 also at 0: all black)
            expect = arr & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)
            assert np.array_equal(np.asarray(posterize(img, bits)), expect), (mode, bits)
    cfg = load_config("convnextv2_tiny_finetune")
    ops = [op for t in build_transform(cfg.data, 3, train=True).transforms[1].transforms for op in getattr(t, "ops", [])]
    names = {op.name for op in ops if op.aug_fn is posterize}
    assert names == {"PosterizeIncreasing"}  # rand-*-inc1's posterize, the one that asks for 0 bits at magnitude 10


def test_seeded_dataset_seeds_python_random_and_numpy_and_restores_them():
    def draw(_img):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)

    ds = SeededDataset(_Repeat(_image(8, 8)), draw, seed=7)
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.Random(123).random(), np.random.RandomState(123).rand()
    first = ds[(2, 1)][0][0]
    assert torch.equal(first, ds[(2, 1)][0][0])  # same (seed, epoch, index): same draws from all three
    other = ds[(3, 1)][0][0]
    assert (first != other).all()  # each generator moves with the index, not only torch's
    assert random.random() == expect_py and np.random.rand() == expect_np  # the caller's streams untouched


def _mix_cfg(**kw):
    over = {"data.augment_lib": "timm", "data.mixup": 0.8, "data.cutmix": 1.0, "data.label_smoothing": 0.1, **kw}
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()]).data


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_our_mixup_equals_timm_mixup_for_the_same_seed(mode):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    cfg = _mix_cfg(**{"data.mixup_mode": mode})
    ours = build_mixup(cfg, num_classes=5)
    assert isinstance(ours, TimmMixup)
    ref = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                num_classes=5)
    g = torch.Generator().manual_seed(0)
    cut = 0
    torch.manual_seed(0)
    for _ in range(8):  # both MixUp and CutMix batches
        x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
        state = torch.get_rng_state()
        a, ta = ours(x.clone(), y)
        torch.set_rng_state(state)
        seed = int(torch.randint(2**62, ()))  # the one torch draw TimmMixup seeds NumPy from
        np.random.seed(seed % 2**32)
        random.seed(seed)
        b, tb = ref(x.clone(), y)
        assert torch.equal(a, b) and torch.equal(ta, tb)
        assert ta.shape == (6, 5) and torch.allclose(ta.sum(1), torch.ones(6))
        cut += bool(((a - x).abs().amax(1) == 0).any())  # CutMix leaves pixels outside its box unchanged
        logits = torch.randn(6, 5, generator=g)
        # the loss _supervised uses with timm's Mixup is the official SoftTargetCrossEntropy
        assert torch.allclose(F.cross_entropy(logits, ta), SoftTargetCrossEntropy()(logits, ta))
    assert 0 < cut < 8 or mode != "batch"


def test_timm_mixup_refuses_an_odd_batch_and_leaves_numpy_alone():
    mix = build_mixup(_mix_cfg(), num_classes=5)
    np.random.seed(5)
    expect = np.random.RandomState(5).rand()
    mix(torch.randn(4, 3, 8, 8), torch.arange(4))
    assert np.random.rand() == expect
    with pytest.raises(ValueError, match="even batch"):
        mix(torch.randn(3, 3, 8, 8), torch.arange(3))


def test_timm_only_keys_are_refused_with_the_torchvision_pipeline():
    with pytest.raises(ConfigError, match="data.augment_lib=timm to set data.remode"):
        load_config(overrides=["data.remode=pixel"])
    with pytest.raises(ConfigError, match="data.augment_lib=timm to set data.auto_augment"):
        load_config(overrides=["data.auto_augment=rand-m9-mstd0.5-inc1"])
    with pytest.raises(ConfigError, match="not data.rand_augment"):
        load_config(overrides=["data.augment_lib=timm", "data.rand_augment=n2-m9"])


def test_finetune_cli_with_the_official_timm_augmentations(tmp_path, capsys):
    run = tmp_path / "ft"
    tiny = ["--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.num_workers=0",
            "run.progress=false", "run.max_steps=2", "optim.warmup_epochs=0"]
    assert main(["finetune", "--recipe", "convnextv2_tiny_finetune", *tiny, "--out", str(run),
                 "data.batch_size=8"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["augment_lib"] == "timm" and saved["data"]["remode"] == "pixel"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["train_loss"])
    assert main(["finetune", "--recipe", "convnextv2_tiny_finetune", *tiny, "--out", str(tmp_path / "odd"),
                 "data.batch_size=7"]) == 2
    assert "needs an even batch" in capsys.readouterr().err and not (tmp_path / "odd").exists()



def _fit_timm(out, inputs, stop_at=None):
    """A tiny run through the engine's loop with timm's pipeline and Mixup; ``inputs`` records every batch the loss
    sees (after the augmentations); ``stop_at``: SIGINT in that loss call (saved at the step boundary, stopped)."""
    import signal

    from maskconv.data.build import build_dataset
    from maskconv.engine.loop import fit

    cfg = load_config("convnextv2_tiny_finetune", [
        "data.path=synthetic", "data.img_size=32", "data.batch_size=8", "data.num_workers=0", "optim.epochs=2",
        "optim.lr=1e-2", "optim.warmup_epochs=0.5", "optim.ema_decay=0", "optim.layer_decay=1", "run.device=cpu",
        "run.progress=false", "run.save_every_minutes=0", f"run.out={out}"])
    ds = build_dataset(cfg.data, 3, labeled=True)  # 64 images, 4 classes: 8 steps an epoch
    torch.manual_seed(0)

    def loss_fn(m, x, y):
        inputs.append((x.clone(), y.clone()))
        if stop_at is not None and len(inputs) == stop_at:
            signal.raise_signal(signal.SIGINT)
        return F.cross_entropy(m(x), y)

    res = fit(cfg, TinyProbe(4), ds, build_transform(cfg.data, 3, train=True), loss_fn, task="finetune",
              batch_transform=build_mixup(cfg.data, 4))
    res.run.release()
    return res.model.state_dict()


def test_timm_augmentations_and_mixup_resume_exactly(tmp_path):
    """Per-sample seeds cover timm's ``random`` / NumPy draws and Mixup's NumPy draws come from the checkpointed
    torch RNG: a run stopped mid-epoch and resumed sees the same augmented batches and ends with the same weights,
    bit for bit, as an uninterrupted run."""
    from maskconv.engine.loop import Interrupted

    ref_in, run_in = [], []
    ref = _fit_timm(tmp_path / "ref", ref_in)
    with pytest.raises(Interrupted):
        _fit_timm(tmp_path / "run", run_in, stop_at=11)  # mid second epoch
    resumed = _fit_timm(tmp_path / "run", run_in)
    assert len(ref_in) == len(run_in) == 16
    for (a, ya), (b, yb) in zip(ref_in, run_in):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert ref_in[0][1].ndim == 2  # Mixup's soft targets reached the loss
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
