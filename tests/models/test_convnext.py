"""ConvNeXt V1/V2: registry-wide forward/backward, the timm model contract, bad input, numerics."""
import pytest
import torch

import maskconv
from maskconv.models.convnext import ConvNeXt
from tests.models.test_contract import check_forward_backward_and_feature_info

ALL = maskconv.list_models("convnext*")
# Official-size models above ~30M parameters take seconds each to build and run on 2 CPU cores.
BIG = {"convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
       "convnextv2_small", "convnextv2_base", "convnextv2_large", "convnextv2_huge"}


def _params(name):
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in name]


@pytest.mark.parametrize("name", _params(ALL))  # the tiny test_* variants: tests/models/test_contract.py
def test_forward_backward_every_model(name):
    check_forward_backward_and_feature_info(name)


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnextv2_tiny"])
def test_published_param_counts(name):
    # official READMEs / timm counts (1000-class head): V1 atto 3.70M (timm), V2 atto 3.71M, V2 tiny 28.64M.
    expected = {"convnext_atto": 3.70, "convnextv2_atto": 3.71, "convnextv2_tiny": 28.64}[name]
    with torch.device("meta"):
        m = maskconv.create_model(name)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == expected


def test_headless_model_keeps_head_norm():
    enc = maskconv.create_model("test_convnext", num_classes=0)  # timm: num_classes=0 keeps head.norm (pre-logits)
    assert "head.norm.weight" in enc.state_dict() and "head.fc.weight" not in enc.state_dict()


def test_in_chans_and_patch_size():
    m = maskconv.create_model("test_convnextv2", in_chans=1, stem_stride=2, num_classes=4)
    assert m.stride == 16
    assert m(torch.randn(3, 1, 32, 48)).shape == (3, 4)
    m4 = maskconv.create_model("test_convnextv2", in_chans=4)
    assert m4(torch.randn(1, 4, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 64, 64), "3 channels|1 channels"), ((2, 3, 70, 64), "not divisible by the model's total stride 32"),
     ((3, 64, 64), "4-D")],
)
def test_bad_input_is_a_clear_error(shape, match):
    m = maskconv.create_model("test_convnext")
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match="unknown model 'convnextv2_tiyn'.*convnextv2_tiny"):
        maskconv.create_model("convnextv2_tiyn")
    with pytest.raises(ValueError, match="never downloads"):
        maskconv.create_model("convnextv2_atto", pretrained=True)


def test_drop_path_per_sample_and_eval_identity():
    m = maskconv.create_model("test_convnext", drop_path_rate=0.5, num_classes=2)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(1)
    c = m(x)
    torch.manual_seed(2)
    d = m(x)
    assert not torch.allclose(c, d)  # stochastic depth active in training


def test_no_weight_decay_lists_grn_and_layer_scale():
    v2 = maskconv.create_model("test_convnextv2")
    nwd = v2.no_weight_decay()
    assert "stages.0.blocks.0.mlp.grn.weight" in nwd and "stages.0.blocks.0.mlp.grn.bias" in nwd
    v1 = maskconv.create_model("test_convnext")
    assert "stages.0.blocks.0.gamma" in v1.no_weight_decay()


def _official_single(name, depths):
    """Official ConvNeXt-V2 optim_factory 'single' on the official key names (facebookresearch/ConvNeXt-V2 optim_factory.py)."""
    parts = name.split(".")
    if name.startswith("downsample_layers"):
        return sum(depths[: int(parts[1])]) + 1
    if name.startswith("stages"):
        return sum(depths[: int(parts[1])]) + int(parts[2]) + 1
    return sum(depths) + 1


def _official_group(name):
    parts = name.split(".")
    if name.startswith("downsample_layers"):
        s = int(parts[1])
        return 0 if s == 0 else (s + 1 if s in (1, 2) else 12)
    if name.startswith("stages"):
        s, b = int(parts[1]), int(parts[2])
        return s + 1 if s in (0, 1) else (3 + b // 3 if s == 2 else 12)
    return 13


def _to_official(name):
    import re

    name = re.sub(r"^stem\.", "downsample_layers.0.", name)
    name = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", name)
    return re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", name)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_base"])
def test_layer_ids_match_official_formula(name):
    with torch.device("meta"):
        m = maskconv.create_model(name)
    assert m.num_lr_layers("single") == sum(m.depths) + 1 and m.num_lr_layers("group") == 13
    for n, _ in m.named_parameters():
        assert m.layer_id(n, "single") == _official_single(_to_official(n), m.depths), n
        assert m.layer_id(n, "group") == _official_group(_to_official(n)), n


def test_autocast_bf16_keeps_fp32_statistics():
    m = maskconv.create_model("test_convnextv2", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # bf16 matmuls keep ~3 significant digits; the logits here are O(0.1-1).
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="same length"):
        ConvNeXt(depths=(1, 1), dims=(8, 16, 32))
    with pytest.raises(ValueError, match="global_pool"):
        ConvNeXt(global_pool="max")


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_atto"])
def test_inference_path_gives_the_training_path_bits_and_leaves_input_alone(name):
    # Without autograd the blocks reuse buffers (GELU and GRN in place, residual added into the block output):
    # the logits must be bit-identical to the autograd path, and the caller's tensor must not change.
    torch.manual_seed(0)
    m = maskconv.create_model(name, num_classes=5).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".grn." in n or n.endswith("gamma"):
                p.normal_(0, 0.5)  # GRN / layer scale away from their identity-ish init
    x = torch.randn(2, 3, 64, 64)
    x0 = x.clone()
    with_grad = m(x.clone().requires_grad_(True)).detach()
    with torch.inference_mode():
        no_grad = m(x)
    assert torch.equal(x, x0)
    assert torch.equal(no_grad, with_grad)
    block = m.stages[0].blocks[0]
    h = torch.randn(2, block.norm.weight.numel(), 16, 16).contiguous(memory_format=torch.channels_last)
    h0 = h.clone()
    with torch.no_grad():
        block(h)
    assert torch.equal(h, h0)
