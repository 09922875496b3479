"""ViT: timm parity (strict keys both ways, logits), the model contract, pos-embed resampling, MAE layer ids and
checkpoint layouts (official MAE fine-tuned / pretrained), bad input."""
import warnings

import pytest
import torch

import maskconv
from maskconv.engine.optim import param_groups
from maskconv.models import CheckpointError, load_checkpoint, save_weights
from maskconv.models.vit import VisionTransformer

timm = pytest.importorskip("timm")

OURS = maskconv.list_models("vit_*")
BIG = {"vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"}  # seconds each on 2 CPU cores


def _randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():  # norm weights around 1, everything else small and non-zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in n and n.endswith("weight") else 0.0))


def test_names_are_timms():
    assert OURS == ["vit_base_patch16_224", "vit_huge_patch14_224", "vit_large_patch16_224", "vit_small_patch16_224",
                    "vit_tiny_patch16_224"]
    assert all(n in timm.list_models() for n in OURS + ["test_vit"])


_PARITY = [("test_vit", "token"), ("test_vit", "avg")] + [
    pytest.param(n, "token", marks=pytest.mark.slow) if n in BIG else (n, "token") for n in OURS]


@pytest.mark.parametrize("name,pool", _PARITY)
def test_same_logits_and_strict_loading_both_ways(name, pool):
    ours = maskconv.create_model(name, global_pool=pool, num_classes=10).eval()
    ref = timm.create_model(name, global_pool=pool, num_classes=10, dynamic_img_size=True).eval()
    p = ours.patch_size
    x = torch.randn(2, 3, 4 * p, 6 * p)  # non-square and not the stored grid: pos_embed is resampled
    _randomise(ref, seed=1)
    load_checkpoint(ours, ref.state_dict(), strict=True)  # timm -> ours
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    _randomise(ours, seed=2)
    ref.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_feature_info_and_intermediates_match_timm():
    ours = maskconv.create_model("test_vit", num_classes=0).eval()
    ref = timm.create_model("test_vit", num_classes=0).eval()
    ref.load_state_dict(ours.state_dict())
    assert [(f["module"], f["num_chs"], f["reduction"]) for f in ours.feature_info] == \
           [(f["module"], f["num_chs"], f["reduction"]) for f in ref.feature_info]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x, norm=True)
        rfinal, rinter = ref.forward_intermediates(x, norm=True)
    assert len(inter) == 6 and inter[0].shape == (2, 64, 4, 6)
    torch.testing.assert_close(final, rfinal, rtol=0, atol=1e-5)
    for a, b in zip(inter, rinter):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forward_intermediates_tokens_nlc_and_prefix_tokens():
    """ViT-specific parts (the rest of the contract: tests/models/test_contract.py)."""
    m = maskconv.create_model("test_vit", num_classes=3).eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert final.shape == (1, 1 + 3 * 2, 64)  # tokens, as timm's forward_features
        nlc = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[0]
        assert torch.equal(nlc, inter[5].flatten(2).transpose(1, 2))
        (grid, cls), = m.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert cls.shape == (1, 1, 64) and torch.equal(grid, inter[5])


def test_pos_embed_stored_grid_is_used_as_is_and_resampled_elsewhere():
    m = maskconv.create_model("test_vit", img_size=64)  # stored grid 4x4
    assert m.pos_grid == (4, 4) and m.pos_embed.shape == (1, 17, 64)
    assert m.pos_embed_for((4, 4)) is m.pos_embed
    other = m.pos_embed_for((2, 6))
    assert other.shape == (1, 13, 64) and torch.equal(other[:, 0], m.pos_embed[:, 0])


def test_global_pool_head_and_reset_classifier():
    m = maskconv.create_model("test_vit", num_classes=5, global_pool="avg").eval()
    keys = m.state_dict().keys()
    assert "fc_norm.weight" in keys and "norm.weight" not in keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = m.forward_features(x)
        pooled = m.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, m.fc_norm(tokens[:, 1:].mean(1)))
        m.reset_classifier(0)
        assert torch.equal(m(x), pooled) and m.num_classes == 0
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="token")
    with pytest.raises(ValueError, match="global_pool"):
        maskconv.create_model("test_vit", global_pool="max")


@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans(in_chans, tmp_path):
    rgb = maskconv.create_model("test_vit", num_classes=0)
    path = save_weights(rgb, tmp_path / "rgb.safetensors")
    m = maskconv.create_model("test_vit", num_classes=0, in_chans=in_chans, pretrained=str(path))
    assert m(torch.randn(1, in_chans, 32, 32)).shape == (1, 64)


def _mae_layer_id(name, num_layers):
    """MAE util/lr_decay.py get_layer_id_for_vit, transcribed."""
    if name in ["cls_token", "pos_embed"]:
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_layer_ids_match_mae_rule_and_feed_layer_decay():
    m = maskconv.create_model("test_vit", num_classes=4, global_pool="avg")
    top = m.num_lr_layers()
    assert top == 7
    for n, _ in m.named_parameters():
        assert m.layer_id(n) == _mae_layer_id(n, top), n
    groups = param_groups(m, weight_decay=0.05, layer_decay=0.65, backbone=m)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["cls_token"] == pytest.approx(0.65**7) and scale["blocks.2.attn.qkv.weight"] == pytest.approx(0.65**4)
    assert scale["head.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["pos_embed"] == decay["cls_token"] == decay["blocks.0.norm1.weight"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05
    with pytest.raises(ValueError, match="single"):
        m.num_lr_layers("group")


@pytest.mark.parametrize("shape,match", [((1, 3, 40, 32), "not divisible by the patch size 16"),
                                         ((1, 1, 32, 32), "in_chans=3"), ((3, 32, 32), "4-D")])
def test_bad_input_is_a_clear_error(shape, match):
    m = maskconv.create_model("test_vit")
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="img_size"):
        VisionTransformer(img_size=30, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(img_size=32, patch_size=16, embed_dim=30, depth=1, num_heads=4)


# ---- checkpoint layouts ------------------------------------------------------------------------------------
def _timm_sd(pool, num_classes, seed=0):
    """A state dict in MAE's naming: MAE builds on timm's VisionTransformer/Block, so its keys are timm's."""
    t = timm.create_model("test_vit", global_pool=pool, num_classes=num_classes)
    _randomise(t, seed)
    return t, t.state_dict()


def test_official_mae_finetuned_layout_same_logits():
    t, sd = _timm_sd("avg", 10)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    m = maskconv.create_model("test_vit", global_pool="avg", num_classes=10).eval()
    rep = load_checkpoint(m, {"model": sd})  # official files wrap the weights under 'model'
    assert rep.layout == "timm" and not rep.skipped
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t.eval()(x), rtol=0, atol=1e-5)
    token = maskconv.create_model("test_vit", num_classes=10)
    with pytest.raises(CheckpointError, match="global_pool='avg'"):
        load_checkpoint(token, {"model": sd})


def _mae_pretrain_sd(seed=0):
    """Official MAE pretraining layout: encoder keys + norm, mask_token and decoder_* (models_mae.py)."""
    _, sd = _timm_sd("token", 0, seed)
    g = torch.Generator().manual_seed(seed)
    dd = 32
    sd = dict(sd)
    sd["mask_token"] = torch.randn(1, 1, dd, generator=g)
    sd["decoder_embed.weight"], sd["decoder_embed.bias"] = torch.randn(dd, 64, generator=g), torch.zeros(dd)
    sd["decoder_pos_embed"] = torch.randn(1, 101, dd, generator=g)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(dd)
    sd["decoder_norm.weight"], sd["decoder_norm.bias"] = torch.ones(dd), torch.zeros(dd)
    sd["decoder_pred.weight"], sd["decoder_pred.bias"] = torch.randn(16 * 16 * 3, dd, generator=g), torch.zeros(768)
    return sd


def test_official_mae_pretrain_layout_into_backbone():
    sd = _mae_pretrain_sd()
    enc = maskconv.create_model("test_vit", num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # encoder-only into an encoder: nothing to warn about
        rep = load_checkpoint(enc, {"model": sd})
    assert rep.layout == "mae-pretrain"
    assert torch.equal(enc.blocks[3].mlp.fc2.weight, sd["blocks.3.mlp.fc2.weight"])
    assert torch.equal(enc.norm.weight, sd["norm.weight"])
    # fine-tuning form (global_pool='avg'): as MAE main_finetune, norm dropped and fc_norm left at init
    ft = maskconv.create_model("test_vit", num_classes=5, global_pool="avg")
    with pytest.warns(UserWarning, match="fc_norm"):
        rep = load_checkpoint(ft, {"model": sd}, drop_mismatched_head=True)
    assert torch.equal(ft.fc_norm.weight, torch.ones(64)) and torch.equal(ft.fc_norm.bias, torch.zeros(64))
    assert set(rep.skipped) == {"head.weight", "head.bias"}


def test_pos_embed_resampled_when_loading_another_grid():
    sd = _mae_pretrain_sd()  # pos_embed for 160 px = 10x10 grid
    m = maskconv.create_model("test_vit", num_classes=0, img_size=64)  # 4x4 grid
    load_checkpoint(m, sd)
    assert m.pos_embed.shape == (1, 17, 64)
    assert torch.equal(m.pos_embed[:, 0], sd["pos_embed"][:, 0])
    ref = timm.layers.resample_abs_pos_embed(sd["pos_embed"], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(m.pos_embed.data, ref, rtol=0, atol=0)


def test_classifier_of_another_size_is_dropped(tmp_path):
    _, sd = _timm_sd("token", 1000)
    path = tmp_path / "in1k.pth"
    torch.save({"model": sd}, path)
    with pytest.warns(UserWarning, match="does not fit"):
        m = maskconv.create_model("test_vit", num_classes=3, pretrained=str(path))
    assert torch.equal(m.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_saved_safetensors_load_in_timm(tmp_path):
    m = maskconv.create_model("test_vit", num_classes=0)
    path = save_weights(m, tmp_path / "enc.safetensors")
    ref = timm.create_model("test_vit", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in m.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


@pytest.mark.parametrize("name", OURS)
def test_param_counts_match_timm(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        # num_classes explicit: timm's default pretrained tag for vit_huge_patch14_224 is '.mae' (no head)
        ours = sum(p.numel() for p in maskconv.create_model(name, num_classes=1000).parameters())
        ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
    assert ours == ref


def test_cls_token_classifier_is_never_read_as_pretraining():
    # ConvMAE's rule, here too: norm + head (global_pool='token' fine-tuning) into an 'avg' model used to warn and
    # drop the final norm; it is a classifier state, so it is an error naming the pooling to build.
    _, sd = _timm_sd("token", 10)
    for kw in (dict(), dict(drop_mismatched_head=True)):
        with pytest.raises(CheckpointError, match=r"global_pool='token'.*not a pretraining state"):
            load_checkpoint(maskconv.create_model("test_vit", global_pool="avg", num_classes=10), {"model": sd}, **kw)
    assert load_checkpoint(maskconv.create_model("test_vit", num_classes=10), {"model": sd}).layout == "timm"
    _, backbone = _timm_sd("token", 0)  # no head, no decoder: fits an MAE encoder and a token backbone; says both
    with pytest.warns(UserWarning, match="an MAE pretraining encoder, or a global_pool='token' backbone"):
        load_checkpoint(maskconv.create_model("test_vit", global_pool="avg", num_classes=0), backbone)
