"""FCMAE: sparse (gather) vs dense-masked reference, no leak, loss on masked patches only, weights in/out."""
import warnings

import pytest
import torch

import maskconv
from maskconv.pretrain import create_objective, patchify, random_mask, unpatchify
from maskconv.pretrain.masking import check_mask
from tests.conftest import perturbed_state_dict
from tests.pretrain._substeps import perturb_substep


def _pair(model="test_convnextv2", **kw):
    """Two objectives (gather, dense) with identical, perturbed weights (non-zero GRN)."""
    a = create_objective("fcmae", model=model, sparse="gather", decoder_dim=32, **kw)
    a.load_state_dict(perturbed_state_dict(a, 0.05))
    b = create_objective("fcmae", model=model, sparse="dense", decoder_dim=32, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("model", ["test_convnextv2", "test_convnext"])  # V2 and V1 (the "no GRN" ablation)
def test_gather_equals_dense_loss_and_gradients(model):
    a, b = _pair(model)
    x = torch.randn(3, 3, 64, 96)
    mask = a.make_mask(x)
    la, lb = a(x, mask).loss, b(x, mask).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    ga, gb = dict(a.named_parameters()), dict(b.named_parameters())
    for n, p in ga.items():
        if p.grad is None:
            assert gb[n].grad is None, n
            continue
        # relative to the gradient's scale: fp32 summation order differs between the two paths
        err = (p.grad - gb[n].grad).abs().max() / gb[n].grad.abs().max().clamp_min(1e-12)
        assert err <= 1e-5, (n, err.item())


def test_masked_positions_exactly_zero_after_every_block(monkeypatch):
    from maskconv.pretrain import fcmae

    a, b = _pair()
    x = torch.randn(2, 3, 64, 64)
    mask = a.make_mask(x)
    enc = b.encoder
    seen = []
    orig = fcmae.block_dense

    def recording(blk, y, hidden):
        out = orig(blk, y, hidden)
        seen.append(out)
        return out

    monkeypatch.setattr(fcmae, "block_dense", recording)
    b.forward_encoder(x, mask)  # dense path: block outputs are full maps
    assert len(seen) == sum(enc.depths)
    for out in seen:
        s = out.shape[-1] // mask.shape[-1]
        hidden = mask.repeat_interleave(s, 1).repeat_interleave(s, 2)
        assert (out.permute(1, 0, 2, 3)[:, hidden] == 0).all()
    for obj in (a, b):
        z = obj.forward_encoder(x, mask)
        assert (z.permute(1, 0, 2, 3)[:, mask] == 0).all()
        assert (z.permute(1, 0, 2, 3)[:, ~mask] != 0).any()


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_nothing_masked_equals_dense_model(sparse):
    obj = create_objective("fcmae", model="test_convnextv2", sparse=sparse)
    obj.encoder.load_state_dict(perturbed_state_dict(obj.encoder))
    x = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    torch.testing.assert_close(obj.forward_encoder(x, mask), obj.encoder.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse", ["gather", "dense"])
def test_pixels_under_mask_never_leak(sparse):
    obj = create_objective("fcmae", model="test_convnextv2", sparse=sparse)
    obj.encoder.load_state_dict(perturbed_state_dict(obj.encoder))
    x = torch.randn(2, 3, 96, 96)
    mask = obj.make_mask(x)
    x2 = x.clone()
    hidden_px = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand_as(x)
    x2[hidden_px] = 100 * torch.randn(int(hidden_px.sum()))
    z1, z2 = obj.forward_encoder(x, mask), obj.forward_encoder(x2, mask)
    assert torch.equal(z1, z2)


def test_exact_visible_count_per_sample():
    m = random_mask(16, 7, 7, 0.6)
    assert m.shape == (16, 7, 7) and m.dtype == torch.bool
    assert ((~m).flatten(1).sum(1) == int(49 * 0.4)).all()  # 19 visible, as the official code
    assert len({tuple(r.tolist()) for r in m.flatten(1)}) > 1  # masks differ between samples


def test_loss_uses_masked_patches_only():
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x)
    out = obj(x, mask)
    tgt_a = obj.target(x)
    # Change the target under visible patches only: the loss must not move.
    x2 = x.clone()
    vis_px = (~mask).repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand_as(x)
    x2[vis_px] = torch.randn(int(vis_px.sum()))
    assert torch.equal(obj.forward_loss(x2, out.pred, mask), out.loss)
    # ... while changing a masked patch's target does move it.
    x3 = x.clone()
    x3[~vis_px] += 1.0 * torch.randn(int((~vis_px).sum()))
    assert not torch.equal(obj.forward_loss(x3, out.pred, mask), out.loss)
    # manual formula: mean over masked patches of the per-patch MSE against norm-pix targets
    per = (out.pred - tgt_a).pow(2).mean(-1)
    torch.testing.assert_close(out.loss, per[mask.flatten(1)].mean())


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 64, 96)
    t = patchify(x, 32)
    assert t.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(unpatchify(t, 32, 2, 3, 3), x)
    # (p, q, c) ordering: the first 3 values of patch 0 are pixel (0, 0) of channels 0..2
    assert torch.equal(t[0, 0, :3], x[0, :, 0, 0])
    assert torch.equal(t[0, 1, :3], x[0, :, 0, 32])  # row-major patch order


def test_encoder_weights_load_strict_into_dense_model_and_timm(tmp_path):
    obj = create_objective("fcmae", model="convnextv2_atto", decoder_dim=32)
    sd = obj.encoder_state_dict()
    dense = maskconv.create_model("convnextv2_atto", num_classes=0)
    dense.load_state_dict(sd, strict=True)
    timm = pytest.importorskip("timm")
    timm.create_model("convnextv2_atto", num_classes=0).load_state_dict(sd, strict=True)
    # and the whole objective state (decoder included) round-trips; create_model reads it as a backbone
    path = maskconv.save_weights(obj.state_dict(), tmp_path / "fcmae.safetensors")
    obj2 = create_objective("fcmae", model="convnextv2_atto", decoder_dim=32)
    maskconv.load_checkpoint(obj2, path)
    assert torch.equal(obj2.mask_token, obj.mask_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = maskconv.create_model("convnextv2_atto", pretrained=path, num_classes=10)
    assert torch.equal(m.stem[0].weight, obj.encoder.stem[0].weight)


def test_non_square_one_channel_and_patch_size():
    obj = create_objective("fcmae", model="test_convnextv2", model_kwargs=dict(in_chans=1, stem_stride=2),
                           decoder_dim=16, mask_ratio=0.5)
    x = torch.randn(2, 1, 32, 48)
    out = obj(x)
    assert obj.patch_size == 16 and out.pred.shape == (2, 6, 16 * 16) and out.mask.shape == (2, 2, 3)
    out.loss.backward()


def test_autocast_bf16():
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    x = torch.randn(2, 3, 64, 64)
    mask = obj.make_mask(x)
    ref = obj(x, mask).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = obj(x, mask).loss
    assert torch.isfinite(low)
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)  # bf16 matmuls: ~3 digits


def test_bad_input_errors():
    obj = create_objective("fcmae", model="test_convnextv2")
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="multiples of the patch size 32"):
        obj(torch.randn(2, 3, 64, 70))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 3\)"):
        obj(x, torch.zeros(2, 3, 3, dtype=torch.bool))
    bad = torch.zeros(2, 2, 2, dtype=torch.bool)
    bad[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number of visible patches"):
        obj(x, bad)
    with pytest.raises(ValueError, match="bool"):
        obj(x, torch.zeros(2, 2, 2))
    for r in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
            create_objective("fcmae", model="test_convnextv2", mask_ratio=r)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        create_objective("fcmae", model="test_convnextv2", mask_ratio=0.9)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown objective"):
        create_objective("simmim", model="test_convnextv2")
    with pytest.raises(ValueError, match="sparse"):
        create_objective("fcmae", model="test_convnextv2", sparse="minkowski")
    with pytest.raises(ValueError, match="every patch"):
        check_mask(torch.ones(1, 2, 2, dtype=torch.bool), 1, 2, 2)


def test_few_steps_on_a_fixed_batch_lower_the_loss():
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=32)
    x = torch.randn(4, 3, 64, 64)
    mask = obj.make_mask(x)
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    first = None
    for _ in range(30):  # noise targets: only memorising the batch lowers the loss (0.9997 -> 0.72 here)
        loss = obj(x, mask).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert obj(x, mask).loss.item() < 0.85 * first


def test_pretrain_demo_writes_run_recon_and_curves(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from maskconv.api import run_pretrain_demo
    from maskconv.pretrain import load_objective

    paths = run_pretrain_demo(tmp_path, data="photos", overrides=[
        "model.name=test_convnextv2", "model.stem_stride=4", "data.img_size=64", "data.batch_size=4",
        "run.max_steps=3", "objective.decoder_dim=16", "run.progress=false"])
    assert paths["reconstructions"].stat().st_size > 0 and paths["curves"].stat().st_size > 0
    obj = load_objective(paths["pretraining run"] / "objective.safetensors")
    assert obj.patch_size == 32 and obj.config["decoder_dim"] == 16


def test_batchnorm_encoder_is_flagged():
    # SLaK is a ConvNeXt with conv-BN branches: FCMAE runs it, but BN batch statistics see masked zeros.
    with pytest.warns(UserWarning, match="BatchNorm"):
        create_objective("fcmae", model="test_slak", decoder_dim=16)


# ---- the whole official FCMAE state (encoder + decoder) continues pretraining -------------------------------------
def _official_fcmae_state(sparse: bool, decoder_dim: int = 16):
    """A state dict in facebookresearch/ConvNeXt-V2 ``models/fcmae.py``'s layout for test_convnextv2's shapes:
    ``encoder.*`` (MinkowskiEngine ``SparseConvNeXtV2`` or dense names), ``proj``, ``mask_token``, ``decoder.0.*`` (a
    dense official ConvNeXt V2 ``Block``) and ``pred``; plus the official modules, from tests/models/_official.py."""
    from tests.models._official import Block, OfficialConvNeXt, dense_to_minkowski

    torch.manual_seed(0)
    ref = OfficialConvNeXt((1, 1, 2, 1), (8, 16, 32, 64), v2=True)
    ref.load_state_dict(perturbed_state_dict(ref, 0.1))
    enc = {k: v for k, v in ref.state_dict().items() if not k.startswith(("head.", "norm."))}
    enc = dense_to_minkowski(enc) if sparse else {f"encoder.{k}": v for k, v in enc.items()}
    parts = torch.nn.ModuleDict(dict(proj=torch.nn.Conv2d(64, decoder_dim, 1),
                                     decoder=torch.nn.Sequential(Block(decoder_dim, v2=True)),
                                     pred=torch.nn.Conv2d(decoder_dim, 32 * 32 * 3, 1)))
    parts.load_state_dict(perturbed_state_dict(parts, 0.1))  # GRN gamma/beta non-zero
    dec = dict(parts.state_dict()) | {"mask_token": 0.02 * torch.randn(1, decoder_dim, 1, 1)}
    return enc | dec, dec, ref, parts


@pytest.mark.parametrize("sparse", [True, False])
def test_whole_official_fcmae_state_loads_into_the_objective(tmp_path, sparse):
    sd, dec, ref, parts = _official_fcmae_state(sparse)
    assert len(dec) == 15  # the official decoder keys, mapped one-to-one
    path = tmp_path / "fcmae_official.pt"
    torch.save({"model": sd}, path)  # official checkpoints wrap the weights in 'model'
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    rep = maskconv.load_checkpoint(obj, path)
    assert rep.layout == ("official-fb-sparse" if sparse else "official-fb")
    assert rep.loaded == len(obj.state_dict())
    ours = obj.state_dict()
    for k, name in (("proj.weight", "proj.weight"), ("mask_token", "mask_token"), ("pred.bias", "pred.bias"),
                    ("decoder.0.dwconv.weight", "decoder.0.conv_dw.weight"), ("decoder.0.norm.bias", "decoder.0.norm.bias"),
                    ("decoder.0.pwconv1.weight", "decoder.0.mlp.fc1.weight"),
                    ("decoder.0.pwconv2.bias", "decoder.0.mlp.fc2.bias")):
        assert torch.equal(ours[name], dec[k]), k
    assert torch.equal(ours["decoder.0.mlp.grn.weight"], dec["decoder.0.grn.gamma"].flatten())  # (1, 1, 1, C)
    assert torch.equal(ours["decoder.0.mlp.grn.bias"], dec["decoder.0.grn.beta"].flatten())
    # the decoder computes the official forward_decoder: proj -> mask tokens -> dense V2 block -> 1x1 pred
    z = torch.randn(2, 64, 2, 3)
    mask = torch.tensor([[[True, False, True], [False, True, False]], [[False, False, True], [True, True, False]]])
    m = mask.unsqueeze(1).float()
    with torch.no_grad():
        x = parts["proj"](z)
        x = x * (1 - m) + dec["mask_token"].repeat(2, 1, 2, 3) * m
        want = parts["pred"](parts["decoder"](x)).flatten(2).transpose(1, 2)  # official forward_loss's (N, L, p*p*3)
        torch.testing.assert_close(obj.eval().forward_decoder(z, mask), want, rtol=1e-5, atol=1e-5)
        # and the encoder is the official one (unmasked: every cell visible)
        y = torch.randn(2, 3, 64, 96)
        feats = y
        for ds, st in zip(ref.downsample_layers, ref.stages):
            feats = st(ds(feats))
        got = obj.forward_encoder(y, torch.zeros(2, 2, 3, dtype=torch.bool))
        torch.testing.assert_close(got, feats, rtol=1e-5, atol=1e-5)


def test_official_fcmae_state_of_another_decoder_or_encoder_only_is_a_clear_error():
    from maskconv.models import BackboneOnlyCheckpointError

    sd, dec, _, _ = _official_fcmae_state(True, decoder_dim=32)
    with pytest.raises(maskconv.CheckpointError, match=r"shape mismatch for proj.weight \(32, 64, 1, 1\) vs model "
                                                       r"\(16, 64, 1, 1\)") as e:
        maskconv.load_checkpoint(create_objective("fcmae", model="test_convnextv2", decoder_dim=16), sd)
    # a decoder that does not fit is not "backbone only": a caller must not fall back to loading just the encoder
    assert not isinstance(e.value, BackboneOnlyCheckpointError)
    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=32)
    for enc_only in ({k: v for k, v in sd.items() if k not in dec}, obj.encoder_state_dict()):  # official, ours
        with pytest.raises(BackboneOnlyCheckpointError, match=r"load_checkpoint\(objective.encoder"):
            maskconv.load_checkpoint(obj, enc_only)
    with pytest.raises(maskconv.CheckpointError, match=r"native layout.*shape mismatch for mask_token") as e:  # ours too
        maskconv.load_checkpoint(create_objective("fcmae", model="test_convnextv2", decoder_dim=16), obj.state_dict())
    assert not isinstance(e.value, BackboneOnlyCheckpointError)


def test_cli_pretrain_continues_from_a_whole_official_fcmae_state(tmp_path):
    # `pretrain --init` reads the whole official state (decoder included), not only its encoder: after one step at
    # lr 1e-8 the saved decoder is still the official one (a fresh decoder would differ by ~0.1).
    from maskconv.cli import main
    from maskconv.pretrain import load_objective

    sd, dec, _, _ = _official_fcmae_state(True)
    init = tmp_path / "fcmae_official.pt"
    torch.save({"model": sd}, init)
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(out), "--init", str(init),
                 "data.img_size=64", "data.batch_size=2", "data.num_workers=0", "run.progress=false", "run.max_steps=1",
                 "objective.decoder_dim=16", "optim.lr=1e-8", "optim.weight_decay=0"]) == 0
    obj = load_objective(out / "objective.safetensors")
    got = obj.state_dict()
    for k, name in (("proj.weight", "proj.weight"), ("decoder.0.pwconv1.weight", "decoder.0.mlp.fc1.weight"),
                    ("pred.weight", "pred.weight"), ("mask_token", "mask_token")):
        assert (got[name] - dec[k]).abs().max().item() <= 1e-6, k


def test_cli_pretrain_init_never_falls_back_to_the_encoder_for_a_whole_state_that_does_not_fit(tmp_path, capsys):
    # a whole official state whose decoder does not fit (width 32 vs 16) is that error, not "read the encoder only"
    # (which would train on a fresh decoder and say nothing)
    from maskconv.cli import main

    sd, _, _, _ = _official_fcmae_state(True, decoder_dim=32)
    init = tmp_path / "fcmae_official.pt"
    torch.save({"model": sd}, init)
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(out), "--init", str(init),
                 "data.img_size=64", "data.batch_size=2", "data.num_workers=0", "run.progress=false", "run.max_steps=1",
                 "objective.decoder_dim=16"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch for proj.weight" in err and "encoder weights" not in err
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("step", ["spatial", "channel", "residual"])
def test_block_forward_and_both_masked_paths_are_one_code_path(monkeypatch, step):
    """The dense forward, FCMAE's dense-masked and its gathered path all run the block's named sub-steps: patch one
    and all three change (a copy of the op sequence in any of them would not)."""
    from maskconv.models.convnext import ConvNeXtBlock
    from maskconv.pretrain.fcmae import encode_dense, encode_gather

    a, _ = _pair()
    enc = a.encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    mask = a.make_mask(x)
    nothing = torch.zeros_like(mask)

    def run():
        with torch.no_grad():
            return [enc.forward_features(x), encode_dense(enc, x, mask), encode_gather(enc, x, mask),
                    encode_gather(enc, x, nothing)]

    before = run()
    calls = perturb_substep(monkeypatch, ConvNeXtBlock, step)
    after = run()
    assert len(calls) == 4 * sum(enc.depths)  # once per block in each of the four runs
    for i, (b, c) in enumerate(zip(before, after)):
        assert not torch.allclose(b, c, rtol=1e-3, atol=1e-3), f"path {i} did not use ConvNeXtBlock.{step}"
    # nothing masked: the gathered path is the dense forward, patched or not
    torch.testing.assert_close(after[3], after[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_mlp_feature_point_runs_in_every_path(grad):
    """``ConvNeXt.feature_modules('mlp')`` fires once per block in the dense forward and both masked paths, with
    and without autograd, and sees GELU's output (the no-grad fast path writes it in place inside ``mlp.act``)."""
    from maskconv.pretrain.fcmae import encode_dense, encode_gather

    a, _ = _pair()
    enc = a.encoder
    x = torch.randn(2, 3, 64, 64)
    mask = a.make_mask(x)
    points = enc.feature_modules("mlp")
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for _, m in points]
    try:
        with torch.set_grad_enabled(grad):
            for run in (lambda: enc.forward_features(x), lambda: encode_dense(enc, x, mask),
                        lambda: encode_gather(enc, x, mask)):
                seen.clear()
                run()
                assert len(seen) == len(points) == sum(enc.depths)
                assert all((o >= -0.17).all() and (o != 0).any() for o in seen)  # GELU's range, not zeros
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="'block', 'mlp'"):
        enc.feature_modules("grn")
