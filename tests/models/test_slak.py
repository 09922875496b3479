"""SLaK: sizes against the paper, decomposed kernels in every block, merging, the official checkpoint layout."""
import re

import pytest
import torch
import torch.nn as nn

import maskconv
from maskconv.export import reparameterize_model
from maskconv.layers import DecomposedLargeKernelConv
from maskconv.models import CheckpointError, load_checkpoint
from tests.layers.test_large_kernel import randomize_bn


@pytest.mark.parametrize("name, expected", [("slak_tiny", 50.7), ("slak_small", 91.1), ("slak_base", 158.0)])
def test_dense_param_counts(name, expected):
    # SLaK paper (arXiv:2207.03620) / VITA-Group/SLaK README: dense SLaK-T/S/B 50.7M/91.1M/158.0M
    # (x0.6 density = the README's 30/55/95M non-zeros)
    with torch.device("meta"):
        m = maskconv.create_model(name)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == expected


@pytest.mark.parametrize("name, dims", [("slak_tiny", [124, 249, 499, 998]), ("slak_base", [166, 332, 665, 1331])])
def test_widths_and_stage_kernels(name, dims):
    with torch.device("meta"):
        m = maskconv.create_model(name)
    assert [f["num_chs"] for f in m.feature_info] == dims
    sd = m.state_dict()
    shapes = [tuple(sd[f"stages.{i}.blocks.0.conv_dw.LoRA1.conv.weight"].shape[-2:]) for i in range(4)]
    assert shapes == [(51, 5), (49, 5), (47, 5), (13, 5)]
    assert sd["stages.0.blocks.0.conv_dw.LoRA2.conv.weight"].shape[-2:] == (5, 51)
    assert sd["stages.3.blocks.0.conv_dw.small_conv.conv.weight"].shape[-2:] == (5, 5)
    assert all(isinstance(b.conv_dw, DecomposedLargeKernelConv) for s in m.stages for b in s.blocks)
    assert sd["stages.0.blocks.0.gamma"].shape == (124 if name == "slak_tiny" else 166,)


def test_layer_scale_init_and_ln_elsewhere():
    m = maskconv.create_model("test_slak")
    assert torch.equal(m.stages[0].blocks[0].gamma.detach(), torch.full((8,), 1e-6))
    bn_names = [n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bn_names and all(".conv_dw." in n for n in bn_names)  # BN only inside the large-kernel modules


def test_reparameterize_merges_each_decomposed_kernel_into_one_conv():
    m = reparameterize_model(maskconv.create_model("test_slak", num_classes=5))  # logits: test_contract.py
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    for i, s in enumerate(m.stages):
        k = (11, 9, 7, 5)[i]
        assert s.blocks[0].conv_dw.lkb_reparam.weight.shape == (m.dims[i], 1, k, k)


def test_layer_ids_cover_large_kernel_params():
    m = maskconv.create_model("test_slak")
    assert m.layer_id("stages.2.blocks.0.conv_dw.LoRA1.conv.weight") == m.layer_id("stages.2.blocks.0.norm.weight")
    assert m.layer_id("stem.0.weight") == 1 and m.layer_id("head.fc.weight") == m.num_lr_layers()


def _to_official(sd: dict, old_names: bool = False) -> dict:
    """Our keys -> the official SLaK layout (VITA-Group/SLaK models/SLaK.py), written out independently."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".large_kernel.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        if old_names:
            k = k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2.")
        k = {"head.norm.weight": "norm.weight", "head.norm.bias": "norm.bias", "head.fc.weight": "head.weight",
             "head.fc.bias": "head.bias"}.get(k, k)
        out[k] = v
    return out


@pytest.mark.parametrize("old_names", [False, True])
def test_official_layout_loads_strict_same_logits(tmp_path, old_names):
    src = maskconv.create_model("test_slak", num_classes=4)
    randomize_bn(src)
    official = _to_official(src.state_dict(), old_names)
    assert "stages.1.0.large_kernel.LoRA1.conv.weight" in official or old_names
    assert "downsample_layers.0.0.weight" in official and "stages.0.0.pwconv1.weight" in official
    assert "stages.0.0.gamma" in official and "norm.weight" in official and "head.weight" in official
    path = tmp_path / "slak_official.pth"
    torch.save({"model": official}, path)
    dst = maskconv.create_model("test_slak", num_classes=4)
    report = load_checkpoint(dst, path)
    assert report.layout == "slak" and report.loaded == len(src.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_merged_checkpoint_into_unmerged_model_is_a_clear_error():
    src = reparameterize_model(maskconv.create_model("test_slak"))
    with pytest.raises(CheckpointError, match="reparameterize_model"):
        load_checkpoint(maskconv.create_model("test_slak"), src.state_dict())
    dst = reparameterize_model(maskconv.create_model("test_slak"))
    assert load_checkpoint(dst, src.state_dict()).loaded == len(src.state_dict())


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="kernel_size=8"):
        maskconv.create_model("test_slak", kernel_size=(8, 9, 7, 5))
    with pytest.raises(ValueError, match="one per stage"):
        maskconv.create_model("test_slak", kernel_size=(11, 9, 7))
    with pytest.raises(ValueError, match="small_kernel=7: .*no larger than kernel_size=5"):
        maskconv.create_model("test_slak", small_kernel=7)
