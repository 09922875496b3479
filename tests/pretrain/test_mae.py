"""MAE objective: official forward semantics, loss on masked patches only, no leak, determinism, checkpoint
layouts (official MAE pretraining), save/load, bad input, the CLI end to end."""
import json

import pytest
import torch

import maskconv
from maskconv.layers import sincos_pos_embed_2d
from maskconv.models import load_checkpoint
from maskconv.pretrain import MAE, create_objective, load_objective, random_mask, save_objective
from maskconv.pretrain.targets import patchify

SMALL = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)
DEPTH = 2  # test_vit with 2 of its 6 blocks: the semantics do not depend on depth, the test time does


def _obj(seed=0, model_kwargs=None, **kw):
    torch.manual_seed(seed)
    return create_objective("mae", model="test_vit", model_kwargs=dict(depth=DEPTH, **(model_kwargs or {})),
                            **{**SMALL, **kw})


def _official_forward(obj: MAE, imgs, noise, mask_ratio):
    """Transcription of facebookresearch/mae models_mae.py forward (random_masking by noise argsort, shuffled
    token order, unshuffle with ids_restore), on the objective's own modules. Returns (loss, pred, mask 1=removed)."""
    enc = obj.encoder
    h, w = imgs.shape[2] // obj.patch_size, imgs.shape[3] // obj.patch_size
    pos = sincos_pos_embed_2d(enc.embed_dim, (h, w), cls_token=True)[None]
    x = enc.patch_embed(imgs).flatten(2).transpose(1, 2) + pos[:, 1:]
    n, L, d = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, d))
    mask = torch.ones(n, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (enc.cls_token + pos[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = enc.norm(x)
    x = obj.decoder_embed(x)
    mask_tokens = obj.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + sincos_pos_embed_2d(x.shape[-1], (h, w), cls_token=True)[None]
    for blk in obj.decoder_blocks:
        x = blk(x)
    pred = obj.decoder_pred(obj.decoder_norm(x))[:, 1:, :]
    target = patchify(imgs, obj.patch_size)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def test_matches_official_forward():
    obj = _obj(model_kwargs=dict(img_size=(64, 96))).eval()  # stored grid = input grid: the official case
    x = torch.randn(2, 3, 64, 96)
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss_ref, pred_ref, mask_ref = _official_forward(obj, x, noise, 0.75)
        out = obj(x, mask_ref.bool().view(2, 4, 6))  # official float mask (1 = removed) -> our bool at the edge
    # same ops; only the order of the visible tokens (shuffled vs position order) changes float summation order
    torch.testing.assert_close(out.pred, pred_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert out.pred.shape == (2, 24, 16 * 16 * 3) and int(out.mask.sum()) == 2 * 18


def test_encoder_with_nothing_masked_is_the_backbone_at_any_grid():
    """Pretraining reads the encoder's own position table (resampled off its stored 10x10 grid) exactly as
    fine-tuning and linear probing will, so with no patch hidden the objective's encoder is the backbone."""
    obj = _obj().eval()
    for size in ((64, 96), (160, 160)):  # 4x6 (resampled) and the stored 10x10 grid
        x = torch.randn(2, 3, *size)
        none = torch.zeros(2, size[0] // 16, size[1] // 16, dtype=torch.bool)
        with torch.no_grad():
            torch.testing.assert_close(obj.forward_encoder(x, none), obj.encoder.forward_features(x),
                                       rtol=1e-6, atol=1e-6)


def test_loss_only_on_masked_patches():
    obj = _obj().eval()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 4, 4, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = obj(x, mask).pred
    hidden = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]  # (B, 1, H, W)
    x2 = torch.where(hidden, x, torch.randn_like(x) * 3)  # other targets on the visible patches only
    assert torch.equal(obj.forward_loss(x, pred, mask), obj.forward_loss(x2, pred, mask))
    x3 = torch.where(hidden, torch.randn_like(x), x)  # other targets on the hidden patches
    assert not torch.equal(obj.forward_loss(x, pred, mask), obj.forward_loss(x3, pred, mask))
    per_patch = (pred - obj.target(x)).pow(2).mean(-1)
    torch.testing.assert_close(obj.forward_loss(x, pred, mask), per_patch[mask.flatten(1)].mean())


def test_masked_pixels_never_reach_the_encoder_or_the_prediction():
    obj = _obj().train()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 4, 4, 0.75, generator=torch.Generator().manual_seed(1))
    hidden = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]
    x2 = torch.where(hidden, torch.randn_like(x) * 10, x)
    assert torch.equal(obj.forward_encoder(x, mask), obj.forward_encoder(x2, mask))
    assert torch.equal(obj(x, mask).pred, obj(x2, mask).pred)


def test_given_mask_is_deterministic_and_none_draws_one():
    obj = _obj().train()
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x, generator=torch.Generator().manual_seed(0))
    a, b = obj(x, mask), obj(x, mask)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
    assert torch.equal(mask, obj.make_mask(x, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(1)
    drawn = [obj(x).mask for _ in range(3)]
    assert all((~m).flatten(1).sum(1).tolist() == [4, 4] for m in drawn)  # int(16 * 0.25) visible each
    assert not (torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[1], drawn[2]))


def test_init_and_param_groups():
    obj = _obj()
    enc = obj.encoder
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.data[0], sincos_pos_embed_2d(64, (10, 10), cls_token=True))
    w = obj.decoder_embed.weight  # xavier_uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (64 + 32)) ** 0.5 and torch.equal(obj.decoder_embed.bias, torch.zeros(32))
    assert enc.blocks[0].attn.qkv.weight.abs().max() <= (6 / (64 + 192)) ** 0.5
    assert obj.no_weight_decay() == {"mask_token", "encoder.pos_embed", "encoder.cls_token"}
    from maskconv.engine.optim import param_groups

    names = {n for g in param_groups(obj, 0.05) for n in g["names"]}
    assert "encoder.pos_embed" not in names and "mask_token" in names


def test_autocast_keeps_the_residual_streams_fp32():
    """Under autocast the official fp32 position tables / mask token keep the encoder and decoder residual
    streams in fp32 (as the backbone's own forward); only the matmuls run in bf16."""
    obj = _obj().eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    obj.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = obj.forward_encoder(x, obj.make_mask(x))
        obj(x)
    assert z.dtype == torch.float32 and seen == [torch.float32]


def test_learns_on_a_fixed_batch():
    obj = _obj()
    x = torch.randn(4, 3, 32, 32)
    mask = random_mask(4, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = obj(x, mask).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert obj(x, mask).loss.item() < 0.85 * first


def test_encoder_weights_load_strict_into_backbones():
    obj = _obj()
    enc = maskconv.create_model("test_vit", num_classes=0, depth=DEPTH)
    enc.load_state_dict(obj.encoder_state_dict(), strict=True)
    timm = pytest.importorskip("timm")
    timm.create_model("test_vit", num_classes=0, depth=DEPTH).load_state_dict(obj.encoder_state_dict(), strict=True)


def _official_layout(obj: MAE) -> dict:
    """A state dict in models_mae.py's layout: encoder keys at top level, decoder_* + mask_token, and the fixed
    decoder_pos_embed (1, 1 + L, Dd) that the official model stores."""
    sd = {(k[len("encoder."):] if k.startswith("encoder.") else k): v.clone() for k, v in obj.state_dict().items()}
    sd["decoder_pos_embed"] = sincos_pos_embed_2d(32, (10, 10), cls_token=True)[None]
    return sd


def test_official_pretrain_layout_loads_into_the_objective():
    src = _obj(seed=1).eval()
    sd = _official_layout(src)
    assert {k.split(".")[0] for k in sd} == {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "mask_token",
                                            "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                                            "decoder_pred"}
    obj = _obj(seed=2).eval()
    rep = load_checkpoint(obj, {"model": sd})
    assert rep.layout == "mae-pretrain"
    x = torch.randn(1, 3, 64, 64)
    mask = random_mask(1, 4, 4, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(obj(x, mask).pred, src(x, mask).pred)
    # the backbone alone reads the same file (decoder dropped)
    enc = maskconv.create_model("test_vit", num_classes=0, depth=DEPTH)
    assert load_checkpoint(enc, {"model": sd}).layout == "mae-pretrain"
    assert torch.equal(enc.blocks[1].mlp.fc1.weight, src.encoder.blocks[1].mlp.fc1.weight)


def test_backbone_only_checkpoint_is_refused_by_the_objective_with_a_hint():
    enc = maskconv.create_model("test_vit", num_classes=0, depth=DEPTH)
    with pytest.raises(ValueError, match="load_checkpoint\\(objective.encoder"):
        load_checkpoint(_obj(), enc.state_dict())


def test_save_and_load_objective(tmp_path):
    obj = _obj().eval()
    path = save_objective(obj, tmp_path / "mae.safetensors")
    back = load_objective(path).eval()
    assert isinstance(back, MAE) and back.config == obj.config and back.mask_ratio == 0.75
    x = torch.randn(2, 3, 32, 48)
    mask = back.make_mask(x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x, mask).loss, obj(x, mask).loss)
    assert load_objective(path, mask_ratio=0.5).mask_ratio == 0.5


@pytest.mark.parametrize("shape,mask_shape,match", [
    ((2, 3, 40, 64), (2, 2, 4), "not divisible by the patch size 16"),
    ((2, 3, 64, 64), (2, 2, 2), r"expected \(B, h, w\) = \(2, 4, 4\)"),
    ((2, 1, 64, 64), (2, 4, 4), "in_chans=3"),
])
def test_bad_input_is_a_clear_error(shape, mask_shape, match):
    obj = _obj()
    mask = torch.zeros(mask_shape, dtype=torch.bool)
    mask.view(mask_shape[0], -1)[:, 0] = True
    with pytest.raises(ValueError, match=match):
        obj(torch.randn(shape), mask)


def test_bad_masks_and_encoders():
    obj = _obj()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="bool"):
        obj(x, torch.zeros(2, 2, 2))
    uneven = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])
    with pytest.raises(ValueError, match="same number of visible"):
        obj(x, uneven)
    with pytest.raises(TypeError, match="VisionTransformer"):
        create_objective("mae", model="test_convnextv2")
    with pytest.raises(ValueError, match="VisionTransformer"):  # also a ValueError: one line on the CLI
        create_objective("mae", model="test_convnextv2")
    with pytest.raises(ValueError, match="no option sparse"):  # objective.sparse is FCMAE / ConvMAE only
        create_objective("mae", model="test_vit", sparse="dense")
    with pytest.raises(ValueError, match="global_pool='token'"):
        create_objective("mae", encoder=maskconv.create_model("test_vit", global_pool="avg"))
    with pytest.raises(ValueError, match="decoder_heads"):
        _obj(decoder_heads=5)


def test_cli_pretrain_mae_end_to_end(tmp_path):
    from maskconv.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--objective", "mae", "--model", "test_vit", "--data", "synthetic", "--out", str(run),
                 "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "run.max_steps=2", "run.progress=false",
                 "objective.decoder_dim=32", "objective.decoder_depth=1"]) == 0
    obj = load_objective(run / "objective.safetensors")
    assert isinstance(obj, MAE) and obj.mask_ratio == 0.75 and obj.config["decoder_depth"] == 1  # MAE's default ratio
    enc = maskconv.create_model("test_vit", num_classes=0)
    load_checkpoint(enc, run / "encoder.safetensors", strict=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and 0 < rows[-1]["train_loss"] < 10


def test_cli_mae_encoder_into_linprobe_and_finetune_then_eval(tmp_path):
    """The ViT head is ``head`` (not ConvNeXt's ``head.fc``): the probe head and eval must find it."""
    from maskconv.cli import main

    tiny = ["--model", "test_vit", "--data", "synthetic", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
            "run.progress=false", "run.max_steps=2"]
    pre, lp, ft = tmp_path / "pre", tmp_path / "lp", tmp_path / "ft"
    assert main(["pretrain", *tiny, "--objective", "mae", "--out", str(pre), "objective.decoder_dim=32",
                 "objective.decoder_depth=1"]) == 0
    assert main(["linprobe", *tiny, "--out", str(lp), "--init", str(pre / "encoder.safetensors")]) == 0
    from safetensors.torch import load_file

    probe = load_file(lp / "model.safetensors")
    assert probe["head.1.weight"].shape == (4, 64)  # BatchNorm (no affine) + Linear, MAE's linear-probe head
    enc = load_file(pre / "encoder.safetensors")
    assert torch.equal(probe["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])  # backbone frozen
    assert main(["eval", "--checkpoint", str(lp)]) == 0
    assert main(["finetune", *tiny, "--out", str(ft), "--init", str(pre / "encoder.safetensors"),
                 "optim.layer_decay=0.75", "model.global_pool=avg"]) == 0  # MAE fine-tuning: mean pool + fc_norm
    tuned = load_file(ft / "model.safetensors")
    assert "fc_norm.weight" in tuned and "norm.weight" not in tuned
    assert main(["eval", "--checkpoint", str(ft)]) == 0  # eval rebuilds the avg-pool model from the run config
    assert json.loads((ft / "eval" / "val" / "eval.json").read_text())["images"] > 0
