"""The timm model contract, checked on every registered tiny ``test_*`` variant (as timm's tests run one suite over
all its models): registering a family's tiny variant puts it under every test here. Family-specific behaviour
(official numerics, key layouts, layer ids, sizes) stays in ``tests/models/test_<family>.py``."""
import pytest
import torch
import torch.nn as nn

import maskconv
from maskconv.export import reparameterize_model
from tests.conftest import perturbed_state_dict
from tests.layers.test_large_kernel import randomize_bn

TINY = maskconv.list_models("test_*")


def test_every_family_has_a_tiny_variant():
    families = {type(maskconv.create_model(n)).__module__ for n in TINY}
    assert {f"maskconv.models.{f}" for f in ("convnext", "slak", "replknet", "vit", "convmae")} <= families


def check_forward_backward_and_feature_info(name: str) -> None:
    """Logits shape, a gradient for every parameter, feature_info == the intermediates' widths and strides."""
    m = maskconv.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 96)  # non-square
    out = m(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [fi["num_chs"] for fi in m.feature_info]
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(fi["reduction"],) * 2 for fi in m.feature_info]


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_and_feature_info(name):
    check_forward_backward_and_feature_info(name)


@pytest.mark.parametrize("name", TINY)
def test_in_chans_one_non_square(name):
    m = maskconv.create_model(name, in_chans=1, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        assert m(x).shape == (2, 3)
        feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [fi["num_chs"] for fi in m.feature_info]
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(fi["reduction"],) * 2 for fi in m.feature_info]
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 64, 96))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(1, 64, 96))


@pytest.mark.parametrize("name", TINY)
def test_forward_intermediates_contract(name):
    m = maskconv.create_model(name, num_classes=3).eval()
    m.load_state_dict(perturbed_state_dict(m))
    x = torch.randn(1, 3, 64, 96)
    n = len(m.feature_info)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x)) and len(inter) == n
        if final.ndim == 4:  # a map (ViT's final features are normed tokens)
            assert torch.equal(inter[-1], final)
        assert all(torch.equal(a, b) for a, b in zip(m.forward_intermediates(x, intermediates_only=True), inter))
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2 and all(torch.equal(a, b) for a, b in zip(last2, inter[-2:]))
        picked = m.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], inter[0]) and torch.equal(picked[1], inter[-1])
        _, got = m.forward_intermediates(x, indices=[1], stop_early=True)
        assert len(got) == 1 and torch.equal(got[0], inter[1])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[n])
    with pytest.raises(ValueError, match=f"the model has {n}"):
        m.forward_intermediates(x, indices=n + 1)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", TINY)
def test_forward_head_and_reset_classifier(name):
    m = maskconv.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = m.forward_features(x)
        pooled = m.forward_head(f, pre_logits=True)
        assert pooled.shape == (2, m.num_features)
        torch.testing.assert_close(m.forward_head(f), m.get_classifier()(pooled))
        m.reset_classifier(0)
        assert m.num_classes == 0 and torch.equal(m(x), pooled)  # num_classes=0: the pooled features
    m.reset_classifier(11)
    assert m(x).shape == (2, 11) and m.num_classes == 11


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_same_gradients(name):
    m = maskconv.create_model(name, num_classes=3)
    m.load_state_dict(perturbed_state_dict(m))
    x = torch.randn(2, 3, 64, 96)
    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()  # BN in train mode: re-running a block in backward must not change grads
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", TINY)
def test_reparameterize_whole_model_same_logits(name):
    """Merging every multi-branch module (SLaK / RepLKNet large kernels) keeps the logits, leaves no BatchNorm
    inside a merged module, and is a no-op the second time and for families with nothing to merge."""
    m = maskconv.create_model(name, num_classes=5)
    m.load_state_dict(perturbed_state_dict(m))
    randomize_bn(m)
    m.eval()
    x = torch.randn(2, 3, 64, 96)
    mergeable = [mod for mod in m.modules() if callable(getattr(mod, "reparameterize", None))]
    numel = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        ref = m(x)
        reparameterize_model(m)
        assert (sum(p.numel() for p in m.parameters()) < numel) == bool(mergeable)  # branches merged away
        out = m(x)
        keys = sorted(m.state_dict())
        reparameterize_model(m)
        assert sorted(m.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for mod in mergeable:
        assert not any(isinstance(c, nn.BatchNorm2d) for c in mod.modules()), type(mod).__name__
