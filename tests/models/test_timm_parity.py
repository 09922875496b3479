"""Every ConvNeXt name timm also has: same keys and shapes, strict loading both ways, same logits (<=1e-5)."""
import pytest
import torch

import maskconv
from tests.conftest import perturbed_state_dict

timm = pytest.importorskip("timm")

BIG = {"convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
       "convnextv2_small", "convnextv2_base", "convnextv2_large", "convnextv2_huge"}
SHARED = [n for n in maskconv.list_models("convnext*") if n in timm.list_models()]


def test_timm_has_all_our_names():
    assert sorted(SHARED) == maskconv.list_models("convnext*")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in SHARED])
def test_same_logits_and_strict_loading_both_ways(name):
    ours = maskconv.create_model(name).eval()
    ref = timm.create_model(name, pretrained=False).eval()
    sd = perturbed_state_dict(ref)  # non-zero GRN / biases so every parameter matters
    ref.load_state_dict(sd)
    ours.load_state_dict(sd, strict=True)  # timm -> ours
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), ref(x)
        assert (a - b).abs().max().item() <= 1e-5
        ref2 = timm.create_model(name, pretrained=False).eval()
        ref2.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
        assert (ref2(x) - a).abs().max().item() <= 1e-5
        fa, fb = ours.forward_intermediates(x, intermediates_only=True), ref.forward_intermediates(x, intermediates_only=True)
        for u, v in zip(fa, fb):
            assert (u - v).abs().max().item() <= 1e-4 * max(1.0, v.abs().max().item())


def test_feature_info_matches_timm():
    ours = maskconv.create_model("convnextv2_atto")
    ref = timm.create_model("convnextv2_atto")
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in ours.feature_info] == [
        (f["num_chs"], f["reduction"], f["module"]) for f in ref.feature_info
    ]


def test_saved_safetensors_load_in_timm(tmp_path):
    ours = maskconv.create_model("convnextv2_atto", num_classes=10)
    path = maskconv.save_weights(ours, tmp_path / "w.safetensors")
    ref = timm.create_model("convnextv2_atto", num_classes=10, checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ref(x) - ours.eval()(x)).abs().max().item() <= 1e-5
