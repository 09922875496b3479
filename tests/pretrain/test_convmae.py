"""ConvMAE objective: gather == dense (official), no leak from masked pixels, loss on masked patches only,
official pretraining layout, save/load, bad input, the CLI end to end."""
import json

import pytest
import torch

import maskconv
from maskconv.layers import sincos_pos_embed_2d
from maskconv.pretrain import create_objective, load_objective, save_objective
from maskconv.pretrain.targets import patchify
from tests.conftest import perturbed_state_dict
from tests.pretrain._substeps import perturb_substep

KW = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)


def _pair(**kw):
    """Two objectives (gather, dense) with identical, perturbed weights."""
    a = create_objective("convmae", model="test_convmae", sparse="gather", **KW, **kw)
    a.load_state_dict(perturbed_state_dict(a, 0.05))
    b = create_objective("convmae", model="test_convmae", sparse="dense", **KW, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _hidden_pixels(mask, x, p=16):
    return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).expand_as(x)


def _official_forward(obj, imgs, noise, mask_ratio):
    """Transcription of Alpha-VL/ConvMAE models_convmae.py forward on the objective's own modules: random_masking
    by noise argsort, masks upsampled by repeat/reshape/permute, (1 - mask) multiplying the depthwise input,
    fusion maps gathered at ids_keep and added after blocks3 (before the final norm), decoder unshuffled with
    ids_restore, norm-pix loss on removed patches. Returns (loss, pred, mask 1 = removed)."""
    enc, n = obj.encoder, imgs.shape[0]
    h, w = imgs.shape[2] // 16, imgs.shape[3] // 16
    L = h * w
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)

    def up(s):  # official mask_for_patch1 / mask_for_patch2
        return (mask.reshape(-1, h, w).unsqueeze(-1).repeat(1, 1, 1, s * s).reshape(-1, h, w, s, s)
                .permute(0, 1, 3, 2, 4).reshape(n, h * s, w * s).unsqueeze(1))

    def cblock(blk, x, m):  # official CBlock.forward(x, mask) with mask = 1 - mask_for_patch
        x = x + blk.conv2(blk.attn(m * blk.conv1(blk.norm1(x))))
        mlp = blk.mlp  # official CMlp.forward: fc2(act(fc1(x))) with 1x1 convs on NCHW (dropout 0)
        return x + mlp.fc2(mlp.act(mlp.fc1(blk.norm2(x))))

    def keep(t):
        return torch.gather(t, 1, ids_keep[..., None].repeat(1, 1, t.shape[-1]))

    x = enc.patch_embed1(imgs)
    for blk in enc.blocks1:
        x = cblock(blk, x, 1 - up(4))
    s1 = obj.stage1_output_decode(x).flatten(2).permute(0, 2, 1)
    x = enc.patch_embed2(x)
    for blk in enc.blocks2:
        x = cblock(blk, x, 1 - up(2))
    s2 = obj.stage2_output_decode(x).flatten(2).permute(0, 2, 1)
    x = enc.patch_embed4(enc.patch_embed3(x).flatten(2).permute(0, 2, 1))
    x = keep(x + enc.pos_embed)  # official self.pos_embed: the fixed table of the (one) grid
    for blk in enc.blocks3:
        x = blk(x)
    x = obj.norm(x + keep(s1) + keep(s2))
    x = obj.decoder_embed(x)
    x = torch.cat([x, obj.mask_token.repeat(n, L - x.shape[1], 1)], dim=1)
    x = torch.gather(x, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = x + sincos_pos_embed_2d(x.shape[-1], (h, w))[None]
    for blk in obj.decoder_blocks:
        x = blk(x)
    pred = obj.decoder_pred(obj.decoder_norm(x))
    target = patchify(imgs, 16)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_matches_official_forward(sparse):
    # stored grid = input grid (4x6, non-square): the official case (one fixed 14x14 table there; same formula)
    obj = _pair(model_kwargs=dict(img_size=(64, 96)))[0 if sparse == "gather" else 1].eval()
    x = torch.randn(2, 3, 64, 96)
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss_ref, pred_ref, mask_ref = _official_forward(obj, x, noise, 0.75)
        out = obj(x, mask_ref.bool().view(2, 4, 6))  # official float mask (1 = removed) -> our bool at the edge
    # same ops; visible tokens in position order (ours) vs shuffled order (official) changes summation order only
    torch.testing.assert_close(out.pred, pred_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-5, atol=1e-6)


def test_gather_equals_dense_loss_and_gradients():
    a, b = _pair()
    x = torch.randn(3, 3, 64, 96)  # non-square 4x6 grid
    mask = a.make_mask(x)
    oa, ob = a(x, mask), b(x, mask)
    assert oa.pred.shape == (3, 24, 16 * 16 * 3) and oa.mask.shape == (3, 4, 6)
    torch.testing.assert_close(oa.loss, ob.loss, rtol=1e-5, atol=0)
    oa.loss.backward()
    ob.loss.backward()
    gb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.grad is None:  # unused in pretraining: frozen fc_norm / pos_embed
            assert gb[n].grad is None and not p.requires_grad, n
            continue
        # relative to the gradient's scale: fp32 summation order differs between the two paths
        err = (p.grad - gb[n].grad).abs().max() / gb[n].grad.abs().max().clamp_min(1e-12)
        assert err <= 1e-5, (n, err.item())


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_grad_checkpointing_same_gradients(sparse):
    obj = _pair()[0 if sparse == "gather" else 1]
    x = torch.randn(2, 3, 32, 48)
    mask = obj.make_mask(x)
    obj(x, mask).loss.backward()
    ref = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}
    obj.zero_grad()
    obj.encoder.set_grad_checkpointing(True)
    obj(x, mask).loss.backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(obj.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_pixels_under_mask_never_reach_visible_tokens(sparse):
    """The official design masks only the depthwise input; masked cells keep (and carry on their residual/MLP
    paths) their own pixels, but no spatial op reads them, so the visible stage-3 tokens stay exactly the same."""
    a, b = _pair()
    obj = a if sparse == "gather" else b
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x)
    x2 = x.clone()
    hid = _hidden_pixels(mask, x)
    x2[hid] = 100 * torch.randn(int(hid.sum()))
    with torch.no_grad():
        assert torch.equal(obj.forward_encoder(x, mask), obj.forward_encoder(x2, mask))
        assert torch.equal(obj(x, mask).pred, obj(x2, mask).pred)


def test_leak_check_detects_an_unmasked_convolution(monkeypatch):
    """Control for the test above: without the masked depthwise input, masked pixels do reach visible tokens."""
    from maskconv.pretrain import convmae

    _, obj = _pair()
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x)
    x2 = x.clone()
    hid = _hidden_pixels(mask, x)
    x2[hid] = 100 * torch.randn(int(hid.sum()))
    monkeypatch.setattr(convmae, "upsample_mask", lambda m, s: torch.zeros_like(m).repeat_interleave(s, 1)
                        .repeat_interleave(s, 2))  # stage 1-2 masks: nothing hidden
    with torch.no_grad():
        assert not torch.allclose(obj.forward_encoder(x, mask), obj.forward_encoder(x2, mask))


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_autocast_keeps_the_residual_streams_fp32(sparse):
    """Under autocast the official fp32 position tables / mask token keep the stage-3 and decoder residual
    streams in fp32 (as the backbone's own forward); only the matmuls and convs run in bf16."""
    obj = create_objective("convmae", model="test_convmae", sparse=sparse, **KW).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    obj.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = obj.forward_encoder(x, obj.make_mask(x))
        obj(x)
    assert z.dtype == torch.float32 and seen == [torch.float32]


def test_loss_uses_masked_patches_only():
    obj = create_objective("convmae", model="test_convmae", **KW)
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x)
    assert ((~mask).flatten(1).sum(1) == 4).all()  # 16 patches, ratio 0.75 by default -> 4 visible
    out = obj(x, mask)
    x2 = x.clone()
    vis = ~_hidden_pixels(mask, x)
    x2[vis] = torch.randn(int(vis.sum()))  # new targets under visible patches only: the loss must not move
    assert torch.equal(obj.forward_loss(x2, out.pred, mask), out.loss)
    x3 = x.clone()
    x3[~vis] += torch.randn(int((~vis).sum()))
    assert not torch.equal(obj.forward_loss(x3, out.pred, mask), out.loss)
    per = (out.pred - obj.target(x)).pow(2).mean(-1)
    torch.testing.assert_close(out.loss, per[mask.flatten(1)].mean())


def test_one_channel_images_and_patch_size():
    obj = create_objective("convmae", model="test_convmae", model_kwargs=dict(in_chans=1, patch_size=2), **KW)
    assert obj.patch_size == 8
    out = obj(torch.randn(2, 1, 32, 48))
    assert out.pred.shape == (2, 24, 8 * 8) and out.loss.ndim == 0


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    obj = create_objective("convmae", model="test_convmae", **KW)
    x = torch.randn(4, 3, 32, 32)
    mask = obj.make_mask(x)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(6):
        loss = obj(x, mask).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first  # a fixed batch of noise: 5 steps take its loss down by ~17%


def test_encoder_weights_load_strict_into_backbone_and_objective_roundtrips(tmp_path):
    obj = create_objective("convmae", model="test_convmae", **KW)
    obj.load_state_dict(perturbed_state_dict(obj))
    maskconv.create_model("test_convmae", num_classes=0).load_state_dict(obj.encoder_state_dict(), strict=True)
    path = save_objective(obj, tmp_path / "convmae.safetensors")
    again = load_objective(path)
    assert type(again).__name__ == "ConvMAE" and again.config == obj.config
    assert all(torch.equal(v, obj.state_dict()[k]) for k, v in again.state_dict().items())
    # the whole objective state reads as a backbone checkpoint too
    enc = maskconv.create_model("test_convmae", num_classes=0)
    maskconv.load_checkpoint(enc, path)
    assert torch.equal(enc.blocks3[0].attn.qkv.weight, obj.encoder.blocks3[0].attn.qkv.weight)


def test_official_pretraining_state_loads_into_objective():
    obj = create_objective("convmae", model="test_convmae", decoder_dim=16, decoder_depth=1, decoder_heads=2)
    ours = perturbed_state_dict(obj)
    # official MaskedAutoencoderConvViT keys: encoder at the top level, fixed decoder_pos_embed, no fc_norm
    official = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in ours.items()
                if not k.startswith("encoder.fc_norm.")}
    official["decoder_pos_embed"] = torch.zeros(1, 16, 16)
    fresh = create_objective("convmae", model="test_convmae", decoder_dim=16, decoder_depth=1, decoder_heads=2)
    report = maskconv.load_checkpoint(fresh, official)
    assert report.layout == "official-pretrain"
    sd = fresh.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ours.items() if not k.startswith("encoder.fc_norm."))
    with pytest.raises(maskconv.CheckpointError, match="backbone-only"):
        maskconv.load_checkpoint(fresh, obj.encoder_state_dict())


def test_bad_input_is_a_clear_error():
    obj = create_objective("convmae", model="test_convmae", **KW)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="bool"):
        obj(x, torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"expected \(B, h, w\)"):
        obj(x, torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        obj(torch.randn(2, 3, 40, 32))
    with pytest.raises(ValueError, match="1 channels but the model was built with in_chans=3"):
        obj(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="ConvViT"):
        create_objective("convmae", model="test_convnext")
    for bad, match in ((dict(mask_ratio=1.0), "mask_ratio"), (dict(sparse="minkowski"), "sparse"),
                       (dict(decoder_dim=30, decoder_heads=4), "divisible")):
        with pytest.raises(ValueError, match=match):
            create_objective("convmae", model="test_convmae", **{**KW, **bad})


def test_cli_pretrain_convmae_two_steps(tmp_path):
    from maskconv.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--objective", "convmae", "--model", "test_convmae", "--data", "synthetic",
                 "--out", str(out), "data.img_size=32", "data.batch_size=4", "data.num_workers=0", "run.progress=false",
                 "run.max_steps=2", "objective.decoder_dim=32", "objective.decoder_depth=1"]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in rows)
    obj = load_objective(out / "objective.safetensors")
    assert type(obj).__name__ == "ConvMAE" and obj.mask_ratio == 0.75 and len(obj.decoder_blocks) == 1
    maskconv.create_model("test_convmae", num_classes=0, pretrained=str(out / "encoder.safetensors"))
    ft = tmp_path / "ft"  # and fine-tuning starts from it, with the official layer-wise lr decay
    assert main(["finetune", "--model", "test_convmae", "--data", "synthetic", "--out", str(ft), "--init",
                 str(out / "encoder.safetensors"), "data.img_size=32", "data.batch_size=4", "data.num_workers=0",
                 "run.progress=false", "run.max_steps=2", "optim.layer_decay=0.65", "model.head_init_scale=0.001"]) == 0
    assert any("train_loss" in r for r in (ft / "metrics.jsonl").read_text().splitlines())


def test_mae_init_reinitialises_the_encoder_unless_disabled():
    enc = maskconv.create_model("test_convmae", num_classes=0)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    kept = create_objective("convmae", encoder=enc, mae_init=False, **KW)
    assert all(torch.equal(v, before[k]) for k, v in kept.encoder.state_dict().items())
    enc2 = maskconv.create_model("test_convmae", num_classes=0)
    w = create_objective("convmae", encoder=enc2, **KW).encoder.blocks3[0].attn.qkv.weight
    bound = (6 / sum(w.shape)) ** 0.5  # xavier_uniform bound; trunc_normal(.02) weights would sit far inside it
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_reconstruction_picture_tensors():
    from maskconv.viz.reconstruction import reconstruct

    obj = create_objective("convmae", model="test_convmae", **KW)
    x = torch.randn(2, 3, 32, 48)
    r = reconstruct(obj, x)
    hidden = _hidden_pixels(r["mask"], x)
    assert r["pred"].shape == x.shape and (r["masked"][hidden] == 0).all()
    assert torch.equal(r["pasted"][~hidden], x[~hidden]) and torch.equal(r["pasted"][hidden], r["pred"][hidden])


@pytest.mark.parametrize("step", ["mix_in", "spatial", "mix_out", "channel"])
def test_cblock_forward_and_gathered_path_are_one_code_path(monkeypatch, step):
    """CBlock's dense forward (backbone and ``sparse='dense'``) and the gathered path run the block's named
    sub-steps: patch one and all of them change."""
    from maskconv.models.convmae import CBlock

    a, b = _pair()
    x = torch.randn(2, 3, 64, 64)
    mask = a.make_mask(x)

    def run():
        with torch.no_grad():
            return [a.encoder.forward_features(x), a.forward_encoder(x, mask), b.forward_encoder(x, mask)]

    before = run()
    calls = perturb_substep(monkeypatch, CBlock, step)
    after = run()
    n_cblocks = sum(a.encoder.depths[:2])
    assert len(calls) == 3 * n_cblocks
    for i, (p, q) in enumerate(zip(before, after)):
        assert not torch.allclose(p, q, rtol=1e-3, atol=1e-3), f"path {i} did not use CBlock.{step}"
    torch.testing.assert_close(after[1], after[2], rtol=1e-5, atol=1e-5)  # still gather == dense
