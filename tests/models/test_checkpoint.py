"""load_checkpoint: layouts (timm, official FB V1/V2, FCMAE MinkowskiEngine, HF transformers), strictness,
bad files, in_chans adaptation, atomic safetensors saving."""
import os
import re
import warnings

import pytest
import torch

import maskconv
from maskconv.models import CheckpointError, load_checkpoint, read_state_dict
from tests.conftest import perturbed_state_dict
from tests.models._official import OfficialConvNeXt, dense_to_minkowski

DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 32, 64)  # = test_convnextv2 / test_convnext widths


def _official(v2: bool, num_classes=10):
    ref = OfficialConvNeXt(DEPTHS, DIMS, v2=v2, num_classes=num_classes).eval()
    ref.load_state_dict(perturbed_state_dict(ref, 0.1))
    return ref


def _ours(v2: bool, **kw):
    # test_convnext has depths (1,1,1,1); build the official depths directly for V1
    from maskconv.models.convnext import ConvNeXt

    ver = dict(use_grn=True, ls_init_value=None) if v2 else dict(ls_init_value=1e-6)
    return ConvNeXt(depths=DEPTHS, dims=DIMS, **{**ver, **kw}).eval()


@pytest.mark.parametrize("v2", [False, True])
def test_official_fb_layout(tmp_path, v2):
    ref = _official(v2)
    torch.save({"model": ref.state_dict()}, tmp_path / "fb.pth")  # official checkpoints wrap in 'model'
    ours = _ours(v2, num_classes=10)
    rep = load_checkpoint(ours, tmp_path / "fb.pth")
    assert rep.layout == "fb" and not rep.skipped
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_official_v2_conv_mlp_layout_reshapes():
    # atto..nano keep MLP weights as 1x1 convs (timm's layout); the official Linear weights must reshape into them.
    ref = _official(True)
    ours = _ours(True, num_classes=10, conv_mlp=True)
    load_checkpoint(ours, ref.state_dict())
    assert ours.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_fcmae_minkowski_layout_with_decoder_loads_into_encoder(tmp_path):
    ref = _official(True)
    sparse = dense_to_minkowski(ref.state_dict())
    sparse |= {"mask_token": torch.zeros(1, 512, 1, 1), "proj.weight": torch.zeros(512, 64, 1, 1),
               "decoder.0.dwconv.weight": torch.zeros(512, 1, 7, 7), "pred.weight": torch.zeros(3072, 512, 1, 1)}
    torch.save({"model": sparse}, tmp_path / "fcmae.pt")
    enc = _ours(True, num_classes=0)
    with pytest.warns(UserWarning, match="backbone-only"):
        rep = load_checkpoint(enc, tmp_path / "fcmae.pt")
    assert rep.layout == "fb-sparse" and rep.skipped == ["head.norm.weight", "head.norm.bias"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = ref.downsample_layers, ref.stages
        y = x
        for ds, st in zip(*stages):
            y = st(ds(y))
        assert (enc.forward_features(x) - y).abs().max().item() <= 1e-5
    # The kernel axis order matters: a kernel loaded without the transpose gives different features.
    wrong = dict(sparse)
    k = "encoder.stages.0.0.dwconv.kernel"
    wrong[k] = wrong[k].reshape(7, 7, -1).transpose(0, 1).reshape(49, -1)
    enc2 = _ours(True, num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint(enc2, wrong)
    assert not torch.allclose(enc2.stages[0].blocks[0].conv_dw.weight, enc.stages[0].blocks[0].conv_dw.weight)


def test_fcmae_dense_pt_only_layout():
    # Released pt_only FCMAE checkpoints: dense official keys, no head, GRN (1,1,1,C) (ConvNeXt-V2#47/#65).
    sd = {k: v for k, v in _official(True).state_dict().items() if not k.startswith(("head.", "norm."))}
    enc = _ours(True, num_classes=0)
    with pytest.warns(UserWarning, match="backbone-only"):
        rep = load_checkpoint(enc, sd)
    assert rep.layout == "fb"
    assert torch.equal(enc.stages[0].blocks[0].mlp.grn.weight, sd["stages.0.0.grn.gamma"].flatten())


@pytest.mark.parametrize("v2", [False, True])
def test_hf_transformers_layout_same_logits(v2):
    transformers = pytest.importorskip("transformers")
    if v2:
        cfg = transformers.ConvNextV2Config(depths=list(DEPTHS), hidden_sizes=list(DIMS), num_labels=6,
                                            layer_norm_eps=1e-6)
        hf = transformers.ConvNextV2ForImageClassification(cfg).eval()
    else:
        # HF's default final-LN eps is 1e-12 (official: 1e-6); set the official value for an exact comparison.
        cfg = transformers.ConvNextConfig(depths=list(DEPTHS), hidden_sizes=list(DIMS), num_labels=6,
                                          layer_norm_eps=1e-6)
        hf = transformers.ConvNextForImageClassification(cfg).eval()
    hf.load_state_dict(perturbed_state_dict(hf, 0.1))
    ours = _ours(v2, num_classes=6)
    rep = load_checkpoint(ours, hf.state_dict())
    assert rep.layout == "hf"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_strict_errors_list_keys():
    ours = _ours(True, num_classes=10)
    sd = ours.state_dict()
    del sd["stages.1.blocks.0.mlp.grn.weight"]  # a GRN must never silently stay at its zero init
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): stages.1.blocks.0.mlp.grn.weight.*unexpected 1 key"):
        load_checkpoint(_ours(True, num_classes=10), sd)
    sd = _ours(True, num_classes=10).state_dict()
    sd["stages.0.blocks.0.conv_dw.weight"] = torch.zeros(8, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r"shape mismatch for stages.0.blocks.0.conv_dw.weight \(8, 1, 5, 5\)"):
        load_checkpoint(_ours(True, num_classes=10), sd)
    with pytest.raises(CheckpointError, match="shape mismatch"):  # a V2 checkpoint into a wider model
        load_checkpoint(maskconv.create_model("convnextv2_atto"), sd)


def test_create_model_pretrained_drops_mismatched_head(tmp_path):
    src = maskconv.create_model("test_convnextv2", num_classes=1000)
    src.load_state_dict(perturbed_state_dict(src))
    path = maskconv.save_weights(src, tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="does not fit the model"):
        m = maskconv.create_model("test_convnextv2", pretrained=path, num_classes=5)
    assert torch.equal(m.stem[0].weight, src.stem[0].weight)
    assert torch.equal(m.head.norm.weight, src.head.norm.weight)
    with pytest.raises(CheckpointError, match="head.fc.weight"):  # plain load_checkpoint stays strict
        load_checkpoint(maskconv.create_model("test_convnextv2", num_classes=5), path)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_adapted_from_rgb(in_chans):
    src = maskconv.create_model("test_convnextv2")
    src.load_state_dict(perturbed_state_dict(src))
    m = maskconv.create_model("test_convnextv2", in_chans=in_chans)
    rep = load_checkpoint(m, src.state_dict())
    assert rep.adapted_in_chans and m.stem[0].weight.shape[1] == in_chans
    if in_chans == 1:  # a gray image through the summed kernel == the same gray image as RGB
        g = torch.randn(1, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(g), src.eval()(g.expand(1, 3, 32, 32)), rtol=1e-4, atol=1e-5)


def test_bad_files_are_clear_errors(tmp_path):
    m = maskconv.create_model("test_convnextv2")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(m, tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(m, tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(m, tmp_path / "junk.pt")
    good = maskconv.save_weights(m, tmp_path / "good.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(m, tmp_path / "trunc.safetensors")
    torch.save({"model": {"a": torch.zeros(1)}, "cfg": {"x": 1}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_checkpoint(m, tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/maskconv_pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": maskconv.create_model("test_convnext").state_dict(), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(tmp_path / "evil.pt")


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    m = maskconv.create_model("test_convnext", num_classes=3)
    path = maskconv.save_weights(m, tmp_path / "w.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        maskconv.save_weights(m, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_roundtrip_torch_and_safetensors(tmp_path):
    m = maskconv.create_model("test_convnextv2", num_classes=3)
    m.load_state_dict(perturbed_state_dict(m))
    for name in ("w.safetensors", "w.pth"):
        m2 = maskconv.create_model("test_convnextv2", num_classes=3, pretrained=tmp_path / name
                                   if maskconv.save_weights(m, tmp_path / name) else None)
        for k, v in m.state_dict().items():
            assert torch.equal(v, m2.state_dict()[k]), k


def test_encoder_file_with_head_norm_is_backbone_only(tmp_path):
    enc = maskconv.create_model("test_convnextv2", num_classes=0)  # has head.norm, no head.fc (FCMAE encoder)
    path = maskconv.save_weights(enc, tmp_path / "encoder.safetensors")
    clf = maskconv.create_model("test_convnextv2", num_classes=7)
    with pytest.warns(UserWarning, match="backbone-only"):
        rep = load_checkpoint(clf, path)  # plain load_checkpoint, strict otherwise
    assert rep.skipped == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(clf.head.norm.weight, enc.head.norm.weight)


def test_checkpoint_num_classes_reads_each_family_and_linear_probe_heads():
    from maskconv.models import checkpoint_num_classes

    vit, cnx = maskconv.create_model("test_vit", num_classes=7), maskconv.create_model("test_convnextv2", num_classes=5)
    assert checkpoint_num_classes(vit.state_dict(), vit) == 7  # 'head'
    assert checkpoint_num_classes(cnx.state_dict(), cnx) == 5  # 'head.fc'
    probe = {"head.fc.0.running_mean": torch.zeros(8), "head.fc.1.weight": torch.zeros(3, 8)}
    assert checkpoint_num_classes(probe, cnx) == 3  # linear probe: BN + Linear
    assert checkpoint_num_classes(maskconv.create_model("test_convnextv2", num_classes=0).state_dict(), cnx) == 0


# ---- strict shapes: a filter reshapes only where its layout is known to differ ------------------------------------
def _reversed(v: torch.Tensor) -> torch.Tensor:
    return v.permute(*reversed(range(v.ndim))).contiguous()


@pytest.mark.parametrize("name", maskconv.list_models("test_*"))
def test_same_size_tensor_of_another_shape_is_refused_naming_key_and_shapes(name):
    # Every weight of every family with its axes reversed (a transposed classifier / Linear, a conv stored
    # (k, k, in, out), a pos table (C, L, 1)): same element count, so the old filter reshaped some of them silently.
    m = maskconv.create_model(name, num_classes=10)
    sd = m.state_dict()
    keys = [k for k, v in sd.items() if v.ndim >= 2 and tuple(v.shape) != tuple(v.shape)[::-1]]
    assert len(keys) >= 15
    for k in keys:
        bad = {**sd, k: _reversed(sd[k])}
        msg = re.escape(f"{k} {tuple(bad[k].shape)} vs model {tuple(sd[k].shape)}")
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(maskconv.create_model(name, num_classes=10), bad)
    # fine-tuning mode drops a classifier of another class count, never one of another shape
    cls = getattr(m, "classifier", "head.fc") + ".weight"
    with pytest.raises(CheckpointError, match=re.escape(f"{cls} (64, 10) vs model (10, 64)")
                       if m.num_features == 64 else re.escape(cls)):
        load_checkpoint(maskconv.create_model(name, num_classes=10), {**sd, cls: _reversed(sd[cls])},
                        drop_mismatched_head=True)


def _layout_state(layout: str, conv_mlp: bool):
    """(state dict in ``layout``, its classifier key, its first-block fc1 key, our model) for a V2 model."""
    ours = _ours(True, num_classes=10, conv_mlp=conv_mlp)
    if layout == "timm":
        sd = dict(ours.state_dict())
        return sd, "head.fc.weight", "stages.0.blocks.0.mlp.fc1.weight", ours
    if layout == "hf":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ConvNextV2Config(depths=list(DEPTHS), hidden_sizes=list(DIMS), num_labels=10)
        sd = dict(transformers.ConvNextV2ForImageClassification(cfg).state_dict())
        return sd, "classifier.weight", "convnextv2.encoder.stages.0.layers.0.pwconv1.weight", ours
    ref = _official(True).state_dict()
    if layout == "fb":
        return dict(ref), "head.weight", "stages.0.0.pwconv1.weight", ours
    sd = dense_to_minkowski(ref) | {k: v for k, v in ref.items() if k.startswith(("head.", "norm."))}
    return sd, "head.weight", "encoder.stages.0.0.pwconv1.linear.weight", ours


@pytest.mark.parametrize("conv_mlp", [False, True])
@pytest.mark.parametrize("layout", ["timm", "fb", "fb-sparse", "hf"])
def test_transposed_classifier_and_fc1_refused_in_every_convnext_layout(layout, conv_mlp):
    sd, head, fc1, ours = _layout_state(layout, conv_mlp)
    assert load_checkpoint(ours, sd).layout == layout  # the untouched state loads
    fc1_shape = (32, 8, 1, 1) if conv_mlp else (32, 8)
    for key, ours_key, model_shape in ((head, "head.fc.weight", (10, 64)), (fc1, "stages.0.blocks.0.mlp.fc1.weight",
                                                                            fc1_shape)):
        bad = {**sd, key: _reversed(sd[key])}  # (64, 10) classifier; fc1 stored (in, out) = (8, 32) or (1, 1, 8, 32)
        shown = tuple(bad[key].shape)
        with pytest.raises(CheckpointError, match=re.escape(f"{ours_key} {shown} vs model {model_shape}")):
            load_checkpoint(_ours(True, num_classes=10, conv_mlp=conv_mlp), bad)


def test_known_reshapes_are_exact_and_only_per_layout():
    from maskconv.models.convnext_layouts import known_reshapes

    target = {"stages.0.blocks.0.mlp.grn.weight": torch.zeros(32), "stages.0.blocks.0.mlp.fc1.weight": torch.zeros(32, 8)}
    grn4, grn2 = torch.arange(32.0).view(1, 1, 1, 32), torch.arange(32.0).view(1, 32)
    out = known_reshapes({"stages.0.blocks.0.mlp.grn.weight": grn4}, target, "fb")
    assert torch.equal(out["stages.0.blocks.0.mlp.grn.weight"], torch.arange(32.0))
    # the dense official form is not the MinkowskiEngine one, and timm stores GRN as (C,) already
    assert known_reshapes({"stages.0.blocks.0.mlp.grn.weight": grn4}, target, "fb-sparse")[
        "stages.0.blocks.0.mlp.grn.weight"].shape == (1, 1, 1, 32)
    assert known_reshapes({"stages.0.blocks.0.mlp.grn.weight": grn2}, target, "fb-sparse")[
        "stages.0.blocks.0.mlp.grn.weight"].shape == (32,)
    assert known_reshapes({"stages.0.blocks.0.mlp.grn.weight": grn4}, target, "timm")[
        "stages.0.blocks.0.mlp.grn.weight"].shape == (1, 1, 1, 32)
    # a 1x1-conv MLP weight into a Linear model: timm's conv_mlp storage, the same (O, I) numbers
    conv = torch.randn(32, 8, 1, 1)
    assert torch.equal(known_reshapes({"stages.0.blocks.0.mlp.fc1.weight": conv}, target, "timm")[
        "stages.0.blocks.0.mlp.fc1.weight"], conv[:, :, 0, 0])


def test_minkowski_kernel_of_another_shape_is_refused():
    sd = dense_to_minkowski(_official(True).state_dict())
    k = "encoder.stages.0.0.dwconv.kernel"
    with pytest.raises(CheckpointError, match=re.escape(f"{k}: a MinkowskiEngine kernel is (k*k, C)") + r".*\(8, 49\)"):
        load_checkpoint(_ours(True, num_classes=0), {**sd, k: sd[k].t()})


# ---- values: non-float tensors into float parameters, NaN / Inf ---------------------------------------------------
def test_non_float_and_non_finite_values_are_errors_with_opt_outs(tmp_path):
    src = maskconv.create_model("test_convnextv2", num_classes=3)
    sd = src.state_dict()
    ints = {**sd, "stem.0.bias": torch.arange(8), "head.fc.bias": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(CheckpointError, match=r"non-float values .*stem.0.bias \(torch.int64\), head.fc.bias \(torch.bool\)"):
        load_checkpoint(maskconv.create_model("test_convnextv2", num_classes=3), ints)
    m = maskconv.create_model("test_convnextv2", num_classes=3)
    load_checkpoint(m, ints, allow_non_float=True)
    assert torch.equal(m.stem[0].bias, torch.arange(8.0))

    nan = {**sd, "stages.0.blocks.0.mlp.fc1.weight": sd["stages.0.blocks.0.mlp.fc1.weight"].clone()}
    nan["stages.0.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    nan["head.norm.weight"] = torch.full((64,), float("inf"))
    path = maskconv.save_weights(nan, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 2 tensor\(s\): stages.0.blocks.0.mlp.fc1.weight "
                                              r"\(1 of 256\), head.norm.weight \(64 of 64\)"):
        load_checkpoint(maskconv.create_model("test_convnextv2", num_classes=3), path)
    with pytest.raises(CheckpointError, match="NaN/Inf"):  # create_model(pretrained=...) is as strict
        maskconv.create_model("test_convnextv2", num_classes=3, pretrained=path)
    m = maskconv.create_model("test_convnextv2", num_classes=3, pretrained=path, allow_nonfinite=True)
    assert m.stages[0].blocks[0].mlp.fc1.weight.isnan().sum() == 1


# ---- layout detection never guesses -----------------------------------------------------------------------------
def test_convnext_state_with_two_layouts_is_refused_naming_both():
    sd = _ours(True, num_classes=10).state_dict() | {"downsample_layers.0.0.weight": torch.zeros(8, 3, 4, 4)}
    with pytest.raises(CheckpointError, match=r"mixes ConvNeXt key layouts: timm \('stem.0.weight'\), "
                                              r"fb \('downsample_layers.0.0.weight'\)"):
        load_checkpoint(_ours(True, num_classes=10), sd)


# ---- explicit filters (timm's pretrained_filter_fn): recorded per class, not found through sys.modules ------------
def test_each_family_and_objective_has_its_registered_filter():
    from maskconv.models import checkpoint_filter_for, convmae, convnext_layouts, replknet, slak, vit
    from maskconv.pretrain import create_objective, convmae as pconvmae, fcmae as pfcmae, mae as pmae

    for name, mod in (("test_convnextv2", convnext_layouts), ("test_slak", slak), ("test_replknet", replknet),
                      ("test_vit", vit), ("test_convmae", convmae)):
        assert checkpoint_filter_for(maskconv.create_model(name)) is mod.checkpoint_filter_fn, name
    for name, model, mod in (("fcmae", "test_convnextv2", pfcmae), ("mae", "test_vit", pmae),
                             ("convmae", "test_convmae", pconvmae)):
        assert checkpoint_filter_for(create_objective(name, model=model, decoder_dim=16)) is mod.checkpoint_filter_fn
    assert checkpoint_filter_for(torch.nn.Linear(2, 2)) is None


class _MyConvNeXt(maskconv.models.ConvNeXt):  # defined here: this test module has no checkpoint_filter_fn
    pass


def test_subclass_reads_its_base_layouts_and_filter_fn_overrides():
    ref = _official(True)
    m = _MyConvNeXt(depths=DEPTHS, dims=DIMS, use_grn=True, ls_init_value=None, num_classes=10).eval()
    assert load_checkpoint(m, ref.state_dict()).layout == "fb"  # found through the class, not sys.modules
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max().item() <= 1e-5
    seen = []

    def mine(sd, model):
        seen.append(model)
        return {k.removeprefix("mine."): v for k, v in sd.items()}, "mine"

    m2 = _ours(True, num_classes=10)
    rep = load_checkpoint(m2, {f"mine.{k}": v for k, v in m.state_dict().items()}, filter_fn=mine)
    assert rep.layout == "mine" and seen == [m2] and torch.equal(m2.stem[0].weight, m.stem[0].weight)


def test_registering_a_filter_twice_is_an_error():
    from maskconv.models import register_checkpoint_filter

    with pytest.raises(ValueError, match="registered twice"):
        register_checkpoint_filter(maskconv.models.ConvNeXt)(lambda sd, m: (sd, "x"))


@pytest.mark.parametrize("name,model", [("fcmae", "test_convnextv2"), ("mae", "test_vit"), ("convmae", "test_convmae")])
def test_backbone_only_state_into_an_objective_is_its_own_error(name, model):
    # the one whole-objective failure after which loading into objective.encoder is right (pretrain --init)
    from maskconv.models import BackboneOnlyCheckpointError
    from maskconv.pretrain import create_objective

    obj = create_objective(name, model=model, decoder_dim=16)
    with pytest.raises(BackboneOnlyCheckpointError, match=r"load_checkpoint\(objective.encoder"):
        load_checkpoint(obj, obj.encoder_state_dict())
    with pytest.raises(CheckpointError) as e:  # a whole state of another decoder width is another error
        load_checkpoint(obj, create_objective(name, model=model, decoder_dim=32).state_dict())
    assert not isinstance(e.value, BackboneOnlyCheckpointError)
