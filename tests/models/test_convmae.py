"""ConvMAE backbone (ConvViT): the model contract, official numerics and key layouts, layer ids, bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import maskconv
from maskconv.layers.pos_embed import sincos_pos_embed_2d
from maskconv.models.convmae import ConvViT
from tests.conftest import perturbed_state_dict


def _official_convvit_forward(sd: dict, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The official ConvViT (global_pool) forward written out from Alpha-VL/ConvMAE vision_transformer.py /
    models_convvit.py, functionally on an official-layout state dict: an independent reference for our modules."""
    def ln(t, p, eps):  # nn.LayerNorm over the last dim
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def patch_embed(t, p, s):  # conv k=s, LN (eps 1e-5: plain nn.LayerNorm) on NHWC, GELU
        t = conv(t, p + ".proj", stride=s)
        return F.gelu(ln(t.permute(0, 2, 3, 1), p + ".norm", 1e-5).permute(0, 3, 1, 2))

    def cblock(t, p):
        c = t.shape[1]
        y = conv(ln(t.permute(0, 2, 3, 1), p + ".norm1", 1e-5).permute(0, 3, 1, 2), p + ".conv1")
        t = t + conv(conv(y, p + ".attn", padding=2, groups=c), p + ".conv2")
        y = ln(t.permute(0, 2, 3, 1), p + ".norm2", 1e-5).permute(0, 3, 1, 2)
        return t + conv(F.gelu(conv(y, p + ".mlp.fc1")), p + ".mlp.fc2")

    def block(t, p):
        b, n, c = t.shape
        qkv = F.linear(ln(t, p + ".norm1", 1e-6), sd[p + ".attn.qkv.weight"], sd[p + ".attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(-1)
        t = t + F.linear((a @ v).transpose(1, 2).reshape(b, n, c), sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
        y = F.gelu(F.linear(ln(t, p + ".norm2", 1e-6), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
        return t + F.linear(y, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])

    def n_blocks(prefix):
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    x = patch_embed(x, "patch_embed1", 4)
    for i in range(n_blocks("blocks1")):
        x = cblock(x, f"blocks1.{i}")
    x = patch_embed(x, "patch_embed2", 2)
    for i in range(n_blocks("blocks2")):
        x = cblock(x, f"blocks2.{i}")
    x = patch_embed(x, "patch_embed3", 2).flatten(2).permute(0, 2, 1)
    x = F.linear(x, sd["patch_embed4.weight"], sd["patch_embed4.bias"]) + sd["pos_embed"]
    for i in range(n_blocks("blocks3")):
        x = block(x, f"blocks3.{i}")
    x = ln(x.mean(1), "fc_norm", 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_matches_official_forward():
    m = maskconv.create_model("test_convmae", num_classes=5, img_size=64).eval()
    m.load_state_dict(perturbed_state_dict(m, 0.1))
    x = torch.randn(2, 3, 64, 64)  # the stored pos-embed grid: no resampling, as the official model
    with torch.no_grad():
        ref = _official_convvit_forward(m.state_dict(), x, num_heads=2)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_shapes_features_and_intermediates_non_square():
    """ConvMAE's shapes on a grid other than the stored pos-embed grid (the forward_intermediates contract itself:
    tests/models/test_contract.py)."""
    m = maskconv.create_model("test_convmae", num_classes=3).eval()
    x = torch.randn(2, 3, 48, 80)  # a 3x5 stage-3 grid, not the stored 4x4 pos-embed grid
    f = m.forward_features(x)
    assert f.shape == (2, 32, 3, 5)
    assert m.forward_head(f, pre_logits=True).shape == (2, 32) and m(x).shape == (2, 3)
    _, inter = m.forward_intermediates(x)
    assert [t.shape[1:] for t in inter] == [(8, 12, 20), (16, 6, 10), (32, 3, 5)]
    assert [fi["reduction"] for fi in m.feature_info] == [4, 8, 16]


def test_pos_embed_is_sincos_and_resampled_for_other_grids():
    m = maskconv.create_model("test_convmae", num_classes=0, img_size=224)
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_2d(32, 14), rtol=0, atol=0)  # 224 / 16 = 14
    assert m.pos_embed_for(14, 14) is m.pos_embed
    assert m.pos_embed_for(8, 12).shape == (1, 96, 32)


def test_in_chans_patch_size_and_reset_classifier():
    m = maskconv.create_model("test_convmae", in_chans=1, patch_size=2, num_classes=4)
    assert m.stride == 8 and m(torch.randn(2, 1, 40, 24)).shape == (2, 4)
    m.reset_classifier(0)
    assert m(torch.randn(1, 1, 16, 16)).shape == (1, 32) and m.num_classes == 0
    m4 = maskconv.create_model("test_convmae", in_chans=4, num_classes=2)
    assert m4(torch.randn(1, 4, 32, 32)).shape == (1, 2)
    torch.manual_seed(0)
    ref = maskconv.create_model("test_convmae", num_classes=2).head.weight
    torch.manual_seed(0)
    scaled = maskconv.create_model("test_convmae", num_classes=2, head_init_scale=0.001).head.weight
    torch.testing.assert_close(scaled, ref * 0.001)


def test_param_counts():
    # convmae_base: 85,374,824 with a 1000-class head, counted by hand from the official module shapes
    # (README rounds ConvMAE-B to "88M", the figure it lists for every base model).
    with torch.device("meta"):
        base, small = maskconv.create_model("convmae_base"), maskconv.create_model("convmae_small")
    assert sum(p.numel() for p in base.parameters()) == 85_374_824
    assert [b.attn.num_heads for b in small.blocks3[:1]] == [6] and small.embed_dims == (128, 256, 384)
    with torch.device("meta"):
        tiny, vit_t = maskconv.create_model("convmae_tiny"), maskconv.create_model("vit_tiny_patch16_224")
    # the tiny config's transformer stage is ViT-Ti's width and heads (what MAE vs ConvMAE compares at)
    assert tiny.embed_dims[-1] == vit_t.embed_dim == 192 and tiny.blocks3[0].attn.num_heads == 3
    assert len(tiny.blocks3) == 11 and tiny.embed_dims == (64, 128, 192)


def test_layer_ids_match_official_rule():
    m = maskconv.create_model("test_convmae", depths=(1, 2, 3))

    def official(name, num_layers):  # Alpha-VL/ConvMAE util/lr_decay.py get_layer_id_for_vit
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed", "blocks1", "blocks2")):
            return 0
        if name.startswith("blocks3"):
            return int(name.split(".")[1]) + 1
        return num_layers

    assert m.num_lr_layers() == 4
    for n, _ in m.named_parameters():
        assert m.layer_id(n) == official(n, 4), n
    assert m.layer_id("blocks3.2.mlp.fc1.weight") == 3 and m.layer_id("head.weight") == 4
    assert m.no_weight_decay() == {"pos_embed"}
    with pytest.raises(ValueError, match="single"):
        m.num_lr_layers("group")


@pytest.mark.parametrize("shape, match", [((2, 1, 32, 32), "1 channels"), ((2, 3, 40, 32), "total stride 16"),
                                          ((3, 32, 32), "4-D")])
def test_bad_input_is_a_clear_error(shape, match):
    with pytest.raises(ValueError, match=match):
        maskconv.create_model("test_convmae")(torch.randn(*shape))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="global_pool"):
        ConvViT(global_pool="token")
    with pytest.raises(ValueError, match="3 entries"):
        ConvViT(depths=(1, 1))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        maskconv.create_model("test_convmae", num_heads=3)
    with pytest.raises(ValueError, match="multiple of the total stride 16"):  # was floored silently
        maskconv.create_model("test_convmae", img_size=100)


def _official_pretrain_state(m: ConvViT) -> dict:
    """A MaskedAutoencoderConvViT state dict: backbone keys without fc_norm / head, plus the pretraining parts."""
    sd = {k: v for k, v in perturbed_state_dict(m).items() if not k.startswith(("fc_norm.", "head."))}
    c1, c2, c3 = m.embed_dims
    sd.update({"norm.weight": torch.ones(c3), "norm.bias": torch.zeros(c3), "mask_token": torch.zeros(1, 1, 16),
               "stage1_output_decode.weight": torch.zeros(c3, c1, 4, 4), "stage1_output_decode.bias": torch.zeros(c3),
               "stage2_output_decode.weight": torch.zeros(c3, c2, 2, 2), "stage2_output_decode.bias": torch.zeros(c3),
               "decoder_embed.weight": torch.zeros(16, c3), "decoder_pos_embed": torch.zeros(1, 16, 16),
               "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(768, 16)})
    return sd


def test_official_pretrain_checkpoint_loads_into_backbone(tmp_path):
    src = maskconv.create_model("test_convmae", num_classes=0)
    sd = _official_pretrain_state(src)
    torch.save({"model": sd}, tmp_path / "convmae_pretrain.pth")  # official checkpoints wrap weights in 'model'
    m = maskconv.create_model("test_convmae", num_classes=0)
    report = maskconv.load_checkpoint(m, tmp_path / "convmae_pretrain.pth")
    assert report.layout == "official-pretrain"
    for k, v in m.state_dict().items():
        if k.startswith("fc_norm."):  # absent from pretraining: left at init, as official fine-tuning
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)), k
        else:
            assert torch.equal(v, sd[k]), k
    with warnings.catch_warnings(record=True) as w:  # into a classifier: the head stays at init, with a warning
        warnings.simplefilter("always")
        clf = maskconv.create_model("test_convmae", num_classes=7, pretrained=str(tmp_path / "convmae_pretrain.pth"))
    assert torch.equal(clf.blocks3[1].attn.qkv.weight, sd["blocks3.1.attn.qkv.weight"])
    assert any("head" in str(x.message) for x in w)


def test_official_finetune_layout_and_other_grids_load():
    src = maskconv.create_model("test_convmae", num_classes=5)  # stored grid 4x4 (img_size 64)
    sd = perturbed_state_dict(src)
    m = maskconv.create_model("test_convmae", num_classes=5)
    assert maskconv.load_checkpoint(m, sd).layout == "official"
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    big = maskconv.create_model("test_convmae", num_classes=5, img_size=96)  # a 6x6 table: resampled on load
    maskconv.load_checkpoint(big, sd)
    assert big.pos_embed.shape == (1, 36, 32) and torch.equal(big.head.weight, sd["head.weight"])
    with pytest.raises(maskconv.CheckpointError, match="unrecognised checkpoint layout"):
        maskconv.load_checkpoint(m, maskconv.create_model("test_convnext").state_dict())


def _official_cls_token_state(num_classes: int = 5) -> dict:
    """An official fine-tuning state trained with ``--cls_token`` (models_convvit.py with global_pool=False): the
    backbone, the final ``norm`` and ``head``; no ``fc_norm``."""
    src = maskconv.create_model("test_convmae", num_classes=num_classes)
    sd = {k: v for k, v in perturbed_state_dict(src).items() if not k.startswith("fc_norm.")}
    c3 = src.embed_dims[2]
    return sd | {"norm.weight": 1 + 0.1 * torch.randn(c3), "norm.bias": 0.1 * torch.randn(c3)}


def test_official_cls_token_finetune_state_is_refused_never_read_as_pretraining(tmp_path):
    sd = _official_cls_token_state()
    path = tmp_path / "convmae_cls_token.pth"
    torch.save({"model": sd}, path)
    msg = r"official-cls-token.*--cls_token|--cls_token.*official-cls-token"
    with pytest.raises(maskconv.CheckpointError, match=msg):  # used to load as 'official-pretrain', norm dropped
        maskconv.load_checkpoint(maskconv.create_model("test_convmae", num_classes=5), path)
    with pytest.raises(maskconv.CheckpointError, match=msg):  # fine-tuning from it (another class count) as well
        maskconv.create_model("test_convmae", num_classes=3, pretrained=str(path))
    # the hint in the message works: without its head it is read as a pretraining encoder, saying so
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    m = maskconv.create_model("test_convmae", num_classes=0)
    with pytest.warns(UserWarning, match=r"fits both .*pretraining encoder and an 'official-cls-token' backbone"):
        assert maskconv.load_checkpoint(m, backbone).layout == "official-pretrain"
    assert torch.equal(m.blocks3[1].mlp.fc2.weight, sd["blocks3.1.mlp.fc2.weight"])
    assert torch.equal(m.fc_norm.weight, torch.ones(32))


def test_convmae_state_with_finetune_and_pretrain_keys_is_refused():
    sd = perturbed_state_dict(maskconv.create_model("test_convmae", num_classes=5))
    sd["mask_token"] = torch.zeros(1, 1, 16)
    with pytest.raises(maskconv.CheckpointError, match="mixes the official fine-tuning .* and pretraining"):
        maskconv.load_checkpoint(maskconv.create_model("test_convmae", num_classes=5), sd)
