"""RepLKNet: sizes against the README, block computations, model contract, merging, official keys, layer ids."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maskconv
from maskconv.export import reparameterize_model
from maskconv.models import load_checkpoint
from maskconv.models.replknet import ConvFFN, RepLKBlock
from tests.layers.test_large_kernel import randomize_bn


@pytest.mark.parametrize("name, expected", [("replknet_31b", 79), ("replknet_31l", 172), ("replknet_xl", 335)])
def test_param_counts_match_readme(name, expected):
    # README: 31B 79M, 31L 172M, XL 335M. Exact counts are 79.86M / 172.67M / 335.44M: the README truncates
    # (it does so for all three), hence int() rather than round().
    with torch.device("meta"):
        m = maskconv.create_model(name)
    assert int(sum(p.numel() for p in m.parameters()) / 1e6) == expected


def test_official_key_names():
    sd = maskconv.create_model("test_replknet").state_dict()
    for k in ["stem.0.conv.weight", "stem.3.bn.running_var", "stages.0.blocks.0.prelkb_bn.weight",
              "stages.0.blocks.0.pw1.conv.weight", "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight",
              "stages.0.blocks.0.large_kernel.small_conv.bn.running_mean", "stages.0.blocks.0.pw2.bn.bias",
              "stages.0.blocks.1.preffn_bn.weight", "stages.0.blocks.1.pw1.conv.weight",
              "stages.0.blocks.1.pw2.conv.weight", "transitions.0.0.conv.weight", "transitions.2.1.bn.weight",
              "head.norm.running_mean", "head.fc.weight"]:
        assert k in sd, k
    assert sd["stages.0.blocks.0.large_kernel.lkb_origin.conv.weight"].shape == (8, 1, 11, 11)
    assert sd["stages.3.blocks.0.large_kernel.small_conv.conv.weight"].shape == (64, 1, 3, 3)
    assert sd["stem.1.conv.weight"].shape == (8, 1, 3, 3) and sd["transitions.0.1.conv.weight"].shape == (16, 1, 3, 3)
    assert sd["stages.1.blocks.1.pw1.conv.weight"].shape == (64, 16, 1, 1)  # ffn_ratio 4
    with torch.device("meta"):
        xl = maskconv.create_model("replknet_xl").state_dict()
    assert xl["stages.0.blocks.0.pw1.conv.weight"].shape == (384, 256, 1, 1)  # dw_ratio 1.5
    assert not any("small_conv" in k for k in xl)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _conv_bn(x, cb):
    c = cb.conv
    return _bn(F.conv2d(x, c.weight, None, c.stride, c.padding, 1, c.groups), cb.bn)


def test_replk_block_and_ffn_compute_the_official_order():
    """Independent functional re-computation of the two blocks (eval mode, random BN state)."""
    blk, ffn = RepLKBlock(6, 6, 7, 3), ConvFFN(6, 24)
    for m in (blk, ffn):
        randomize_bn(m)
        m.eval()
    x = torch.randn(2, 6, 10, 13)
    lk = blk.large_kernel
    h = F.relu(_conv_bn(_bn(x, blk.prelkb_bn), blk.pw1))
    h = F.relu(_conv_bn(h, lk.lkb_origin) + _conv_bn(h, lk.small_conv))
    torch.testing.assert_close(blk(x), x + _conv_bn(h, blk.pw2), rtol=1e-5, atol=1e-5)
    h = F.gelu(_conv_bn(_bn(x, ffn.preffn_bn), ffn.pw1))
    torch.testing.assert_close(ffn(x), x + _conv_bn(h, ffn.pw2), rtol=1e-5, atol=1e-5)


def test_feature_map_and_pooled_width():
    m = maskconv.create_model("test_replknet", num_classes=5, in_chans=1).eval()
    f = m.forward_features(torch.randn(2, 1, 32, 64))
    assert f.shape == (2, 64, 1, 2) and m.forward_head(f, pre_logits=True).shape == (2, 64)


def test_reparameterize_merges_each_large_kernel_into_one_conv():
    m = reparameterize_model(maskconv.create_model("test_replknet", num_classes=5))  # logits: test_contract.py
    for i, stage in enumerate(m.stages):
        lk = stage.blocks[0].large_kernel
        k = (11, 9, 7, 5)[i]
        assert lk.lkb_reparam.weight.shape == (m.dims[i], 1, k, k)
        assert [n for n, _ in lk.named_children()] == ["lkb_reparam"]


def test_official_layout_loads_strict_same_logits(tmp_path):
    src = maskconv.create_model("test_replknet", num_classes=4)
    randomize_bn(src)
    rename = {"head.norm.": "norm.", "head.fc.": "head."}
    official = {}
    for k, v in src.state_dict().items():
        for ours, theirs in rename.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        official[k] = v
    assert "norm.running_var" in official and "head.weight" in official
    path = tmp_path / "replknet_official.pth"
    torch.save({"model": official}, path)
    dst = maskconv.create_model("test_replknet", num_classes=4)
    report = load_checkpoint(dst, path)
    assert report.layout == "replknet" and report.loaded == len(official)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def _official_group(name: str) -> int:
    """RepLKNet-pytorch optim_factory.get_num_layer_for_replknet, on the official names (ours but the head)."""
    if name.startswith("stem"):
        return 0
    if name.startswith("stages"):
        stage_id, block_id = int(name.split(".")[1]), int(name.split(".")[3])
        if stage_id in (0, 1):
            return stage_id + 1
        return 3 + block_id // 4 if stage_id == 2 else 12
    if name.startswith("transitions"):
        t = int(name.split(".")[1])
        return t + 1 if t in (0, 1) else 11
    return 13


def test_layer_ids():
    with torch.device("meta"):
        m = maskconv.create_model("replknet_31b")
    names = [n for n, _ in m.named_parameters()]
    assert [m.layer_id(n, "group") for n in names] == [_official_group(n) for n in names]
    assert m.num_lr_layers("group") == 13 and max(m.layer_id(n, "group") for n in names) == 13
    single = {n: m.layer_id(n) for n in names}
    assert single["stem.0.conv.weight"] == 0 and single["head.fc.weight"] == m.num_lr_layers() == 25
    assert single["stages.0.blocks.0.pw1.conv.weight"] == single["stages.0.blocks.1.pw1.conv.weight"] == 1
    assert single["stages.2.blocks.35.pw2.conv.weight"] == 22 and single["transitions.2.0.conv.weight"] == 23
    for t in range(3):  # a transition shares the id of the first pair of the stage it leads into
        assert single[f"transitions.{t}.1.bn.weight"] == single[f"stages.{t + 1}.blocks.0.prelkb_bn.weight"]


def test_no_weight_decay_and_bn_everywhere():
    m = maskconv.create_model("test_replknet")
    assert m.no_weight_decay() == set()
    assert not any(isinstance(mod, nn.LayerNorm) for mod in m.modules())
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) > 20


def test_common_model_options():
    ref = maskconv.create_model("test_replknet", num_classes=4)
    torch.manual_seed(0)
    a = maskconv.create_model("test_replknet", num_classes=4)
    torch.manual_seed(0)
    b = maskconv.create_model("test_replknet", num_classes=4, head_init_scale=0.001, patch_size=4)
    torch.testing.assert_close(b.head.fc.weight, a.head.fc.weight * 0.001)
    assert ref.head.fc.weight.abs().max() > 0.01  # the default init is not already tiny
    with pytest.raises(ValueError, match="fixed stride of 4"):
        maskconv.create_model("test_replknet", patch_size=2)
