"""optim.name=lars: MAE's linear-probe optimizer (facebookresearch/mae util/lars.py), step by step."""
import json

import pytest
import torch
import torch.nn as nn

from maskconv.cli import main
from maskconv.config import ConfigError, load_config
from maskconv.engine.optim import LARS, build_optimizer


def _by_hand(w, gw, b, gb, steps, lr, wd, momentum=0.9, tc=0.001):
    """MAE's rule written out: a matrix gets g + wd * w scaled by tc * ||w|| / ||g + wd * w||; a vector gets its
    plain gradient; both then SGD with momentum mu = m * mu + d, p = p - lr * mu."""
    w, b = w.clone(), b.clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for g_w, g_b in zip(gw[:steps], gb[:steps]):
        d = g_w + wd * w
        d = d * (tc * w.pow(2).sum().sqrt() / d.pow(2).sum().sqrt())
        mu_w = momentum * mu_w + d
        mu_b = momentum * mu_b + g_b  # no decay, no trust ratio for 1-D
        w, b = w - lr * mu_w, b - lr * mu_b
    return w, b


def test_lars_steps_equal_the_mae_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    gw = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    gb = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = LARS([w, b], lr=0.3, weight_decay=0.05)
    for step in range(3):
        w.grad, b.grad = gw[step].clone(), gb[step].clone()
        opt.step()
        ew, eb = _by_hand(w0, gw, b0, gb, step + 1, lr=0.3, wd=0.05)
        torch.testing.assert_close(w.detach(), ew, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), eb, rtol=1e-12, atol=1e-14)
    assert torch.equal(w.grad, gw[2])  # p.grad itself is left as the backward wrote it


def test_lars_trust_ratio_is_one_at_a_zero_weight_or_zero_update():
    w = nn.Parameter(torch.zeros(3, 4))
    opt = LARS([w], lr=0.5)
    w.grad = torch.ones(3, 4)
    opt.step()  # ||w|| = 0: the plain gradient, not 0 / ||g|| = 0
    assert torch.equal(w.detach(), torch.full((3, 4), -0.5))
    v = nn.Parameter(torch.ones(2, 2))
    opt = LARS([v], lr=0.5)
    v.grad = torch.zeros(2, 2)
    opt.step()  # ||g|| = 0: no division by zero, no NaN
    assert torch.equal(v.detach(), torch.ones(2, 2))


def test_build_optimizer_lars_keeps_the_groups_and_config_chooses_it():
    head = nn.Sequential(nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    opt = build_optimizer(head, lr=0.1, weight_decay=0.0, name="lars")
    assert isinstance(opt, LARS) and all(g["momentum"] == 0.9 and g["trust_coefficient"] == 0.001
                                         for g in opt.param_groups)
    assert {n for g in opt.param_groups for n in g["names"]} == {"1.weight", "1.bias"}
    assert isinstance(build_optimizer(head, 0.1, 0.05), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        build_optimizer(head, 0.1, 0.0, name="sgd")
    with pytest.raises(ConfigError, match="adamw or lars"):
        load_config(overrides=["optim.name=sgd"])


def test_linprobe_cli_trains_the_probe_with_lars_and_resumes(tmp_path):
    run = tmp_path / "lp"
    args = ["linprobe", "--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
            "data.num_workers=0", "run.progress=false", "--out", str(run), "optim.name=lars", "optim.blr=0.1",
            "optim.weight_decay=0", "optim.warmup_epochs=0"]
    assert main([*args, "run.max_steps=2"]) == 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert {k for s in ck["optimizer"]["state"].values() for k in s} == {"mu"}  # LARS's own momentum buffers
    assert json.loads((run / "config.json").read_text())["optim"]["name"] == "lars"
    assert main([*args, "run.max_steps=3", "--allow-config-change"]) == 0  # resumes with LARS's state
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and torch.isfinite(torch.tensor(rows[-1]["train_loss"]))


def test_mae_linprobe_recipe_is_main_linprobes_protocol():
    """The packaged recipe against main_linprobe.py read by hand: LARS, wd 0, blr 0.1, 90 epochs, warm-up 10,
    512 a GPU, class token; the probe's augmentation is RandomResizedCrop(224, bicubic, 0.08-1) + flip and
    nothing stronger (RandAugment / erasing settings do not reach it), its eval resize 256 + centre crop 224."""
    from torchvision.transforms import v2

    from maskconv.config import resolve
    from maskconv.data.build import build_transform
    from maskconv.tasks.classify import train_transform

    cfg = load_config(recipe="mae_linprobe_official", overrides=["data.rand_augment=n2-m9", "data.reprob=0.25"])
    assert cfg.task == "linprobe" and cfg.model.name == "vit_base_patch16_224" and cfg.model.global_pool == "token"
    o = cfg.optim
    assert (o.name, o.epochs, o.warmup_epochs, o.blr, o.min_lr, o.weight_decay) == ("lars", 90, 10, 0.1, 0.0, 0.0)
    assert resolve(cfg, 32, 1000).lr == pytest.approx(0.1 * 16384 / 256)  # 512 x 32 GPUs
    train = train_transform(cfg, linprobe=True).transforms
    assert [type(t) for t in train] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
    assert tuple(train[0].size) == (224, 224) and train[0].scale == (0.08, 1.0)
    assert train[0].interpolation == v2.InterpolationMode.BICUBIC
    val = build_transform(cfg.data, 3, train=False).transforms
    assert list(val[0].size) == [256] and tuple(val[1].size) == (224, 224)
    assert v2.RandAugment in [type(t) for t in train_transform(cfg, linprobe=False).transforms]  # fine-tuning's
