"""load_checkpoint: layouts (timm, official FB V1/V2, FCMAE MinkowskiEngine, HF transformers), strictness,
bad files, in_chans adaptation, atomic safetensors saving."""
import os
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
