"""Optimizer groups (weight decay exemptions, official layer-wise lr decay) and the lr schedule."""
import math

import pytest
import torch

import maskconv
from maskconv.engine.optim import build_optimizer, param_groups
from maskconv.engine.schedule import lr_at, set_lr
from maskconv.pretrain import create_objective
from tests.models.test_convnext import _official_group, _official_single, _to_official


@pytest.mark.parametrize("scheme, name", [("single", "convnextv2_atto"), ("group", "convnextv2_base")])
def test_layer_decay_scales_match_official_formula(scheme, name):
    with torch.device("meta"):
        m = maskconv.create_model(name, num_classes=10)
    ld = 0.8
    groups = param_groups(m, 0.05, layer_decay=ld, scheme=scheme)
    if scheme == "single":  # official: ld ** (num_layers + 1 - id), num_layers = sum(depths)
        top = sum(m.depths) + 1
        official = lambda n: _official_single(_to_official(n), m.depths)  # noqa: E731
    else:  # official: ld ** (13 - id)
        top = 13
        official = lambda n: _official_group(_to_official(n))  # noqa: E731
    seen = 0
    for g in groups:
        for n in g["names"]:
            assert g["lr_scale"] == pytest.approx(ld ** (top - official(n))), n
            seen += 1
    assert seen == sum(1 for _ in m.parameters())


def test_weight_decay_exemptions():
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    groups = param_groups(obj, 0.05)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["mask_token"] == 0.0  # 4-D but never decayed
    assert wd["encoder.stages.0.blocks.0.mlp.grn.weight"] == 0.0
    assert wd["decoder.0.mlp.grn.bias"] == 0.0
    assert wd["encoder.stages.0.blocks.0.conv_dw.bias"] == 0.0
    assert wd["encoder.stages.0.blocks.0.conv_dw.weight"] == 0.05
    assert wd["encoder.stages.0.blocks.0.mlp.fc1.weight"] == 0.05
    assert "encoder.head.norm.weight" not in wd  # frozen in pretraining: not optimised at all


def test_layer_decay_applies_through_set_lr():
    m = maskconv.create_model("test_convnextv2", num_classes=3)
    opt = build_optimizer(m, 1e-3, 0.05, layer_decay=0.5)
    set_lr(opt, 2e-3)
    by_name = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert by_name["head.fc.weight"] == pytest.approx(2e-3)
    top = m.num_lr_layers("single")
    assert by_name["stem.0.weight"] == pytest.approx(2e-3 * 0.5 ** (top - 1))


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)



def test_adamw_is_fused_on_plain_tensors_and_equals_the_foreach_form():
    """The engine's AdamW runs the fused kernel (a fixed ~5x cheaper step on the CPU); three steps give the
    weights the default for-each form gives, to float rounding, with decay and no-decay groups."""
    import copy

    from maskconv.engine.optim import can_fuse

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b = copy.deepcopy(a)
    opt_a = build_optimizer(a, 1e-2, 0.05, (0.9, 0.95))
    assert all(g["fused"] for g in opt_a.param_groups) and len(opt_a.param_groups) == 2
    opt_b = torch.optim.AdamW([dict(params=g["params"], weight_decay=g["weight_decay"])
                               for g in param_groups(b, 0.05)], lr=1e-2, betas=(0.9, 0.95), foreach=True)
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert not can_fuse([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert can_fuse([torch.zeros(2), torch.zeros(3, 3)])
