"""The dense face (``create_model(name, features_only=True)``, models/dense.py) of every family: the maps are the
classifier's ``forward_intermediates`` on the same weights, the metadata is right, pretraining weights load strict."""
import pytest
import torch

import maskconv
from maskconv.models.dense import FeatureNet

FAMILIES = maskconv.list_models("test_*")  # one tiny variant per family: a new family is covered by itself
SIDE = 64


def _same_weights(name, **kw):
    torch.manual_seed(0)
    clf = maskconv.create_model(name, num_classes=0, **kw).eval()
    dense = maskconv.create_model(name, features_only=True, pyramid=False, **kw).eval()
    dense.model.load_state_dict(clf.state_dict(), strict=True)  # the backbone's keys are the classifier's
    return clf, dense


@pytest.mark.parametrize("name", FAMILIES + ["convnextv2_atto", "convnext_atto"])
def test_feature_maps_equal_forward_intermediates(name):
    clf, dense = _same_weights(name)
    n = len(clf.feature_info)
    x = torch.randn(2, 3, SIDE, SIDE)
    default = [n - 3, n - 2, n - 1] if name == "test_vit" else list(range(n))  # timm's defaults
    with torch.no_grad():
        got = dense(x)
        want = clf.forward_intermediates(x, indices=default, intermediates_only=True)
        assert len(got) == len(default) and all(torch.equal(a, b) for a, b in zip(got, want))
        some = maskconv.create_model(name, features_only=True, pyramid=False, out_indices=(0, -1)).eval()
        some.model.load_state_dict(clf.state_dict())
        sub = some(x)
        assert all(torch.equal(a, b) for a, b in zip(sub, clf.forward_intermediates(x, [0, n - 1], intermediates_only=True)))
    # metadata: channels and reductions are the model's, and the maps have them
    assert dense.feature_info.channels() == [clf.feature_info[i]["num_chs"] for i in default]
    assert dense.feature_info.reduction() == [clf.feature_info[i]["reduction"] for i in default]
    assert [tuple(m.shape[1:]) for m in got] == [(c, SIDE // r, SIDE // r) for c, r in
                                                  zip(dense.feature_info.channels(), dense.feature_info.reduction())]


@pytest.mark.parametrize("name", FAMILIES)
def test_out_norm_is_a_layernorm_per_output_over_the_same_maps(name):
    clf, _ = _same_weights(name)
    dense = maskconv.create_model(name, features_only=True, out_norm=True).eval()
    dense.model.load_state_dict(clf.state_dict())
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        raw = FeatureNet(clf, pyramid=dense.pyramid is not None)
        if dense.pyramid is not None:
            raw.pyramid.load_state_dict(dense.pyramid.state_dict())
        for m, r, c in zip(dense(x), raw(x), dense.feature_info.channels()):
            ref = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (c,), eps=1e-6).permute(0, 3, 1, 2)
            torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-5)
    assert len(dense.norms) == len(dense.feature_info)


def test_vit_simple_feature_pyramid_gives_strides_4_to_32_from_the_last_block():
    clf = maskconv.create_model("test_vit", num_classes=0).eval()
    p, d = clf.patch_size, clf.embed_dim
    dense = maskconv.create_model("test_vit", features_only=True).eval()
    dense.model.load_state_dict(clf.state_dict())
    assert dense.feature_info.reduction() == [p // 4, p // 2, p, 2 * p]
    assert dense.feature_info.channels() == [d // 4, d // 2, d, d]
    side = 4 * p
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        maps = dense(x)
        last = clf.forward_intermediates(x, indices=[len(clf.blocks) - 1], intermediates_only=True)[0]
    assert torch.equal(maps[2], last)  # scale 1: the last block's map itself
    assert torch.equal(maps[3], torch.nn.functional.max_pool2d(last, 2))
    assert [tuple(m.shape[1:]) for m in maps] == [(c, side // r, side // r) for c, r in
                                                   zip(dense.feature_info.channels(), dense.feature_info.reduction())]
    two = maskconv.create_model("test_vit", features_only=True, out_indices=(1, 2))
    assert two.feature_info.reduction() == [p // 2, p]
    with pytest.raises(ValueError, match="own stages"):
        maskconv.create_model("test_convnext", features_only=True, pyramid=True)
    with pytest.raises(ValueError, match="features_only=True"):
        maskconv.create_model("test_convnext", out_indices=(0, 1))


def test_layer_ids_are_the_backbones_and_new_layers_get_the_top():
    dense = maskconv.create_model("test_convnextv2", features_only=True, out_norm=True)
    top = dense.model.num_lr_layers()
    for n, _ in dense.named_parameters():
        want = dense.model.layer_id(n[len("model."):]) if n.startswith("model.") else top
        assert dense.layer_id(n) == want
    assert dense.layer_id("model.stem.0.weight") < dense.layer_id("model.stages.3.blocks.0.norm.weight") < top
    assert dense.layer_id("norms.0.weight") == top


@pytest.mark.parametrize("model,objective", [("test_convnextv2", "fcmae"), ("test_vit", "mae"),
                                             ("test_convmae", "convmae")])
def test_pretraining_run_loads_strict_into_the_dense_backbone(tmp_path, model, objective):
    from safetensors.torch import load_file

    from maskconv.cli import main

    out = tmp_path / "pre"
    assert main(["pretrain", "--model", model, "--objective", objective, "--data", "synthetic", "data.img_size=64",
                 "data.batch_size=8", "data.num_workers=0", "run.progress=false", "objective.decoder_dim=32",
                 "run.max_steps=1", "--out", str(out)]) == 0
    enc = load_file(out / "encoder.safetensors")
    dense = maskconv.create_model(model, features_only=True, out_norm=True,
                                  pretrained=str(out / "encoder.safetensors"))
    own = dense.model.state_dict()
    assert set(enc) <= set(own) and all(torch.equal(own[k], v) for k, v in enc.items())
    # the run folder's training checkpoint (the objective's whole state) reads the same encoder
    again = maskconv.create_model(model, features_only=True)
    again.load_backbone(out / "last.pt")
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in enc.items())
