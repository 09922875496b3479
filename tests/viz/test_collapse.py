"""Feature-collapse analysis: its numbers equal an independent forward with explicit activations."""
import pytest
import torch
import torch.nn.functional as F

import maskconv
from maskconv.viz.collapse import feature_collapse, pairwise_cosine_distance
from tests.conftest import perturbed_state_dict


def _model(name="test_convnextv2"):
    m = maskconv.create_model(name, num_classes=0).eval()
    m.load_state_dict(perturbed_state_dict(m, 0.3))  # GRN / layer scale away from their identity init
    return m


def _explicit_features(model, x: torch.Tensor):
    """Per block: (output (B, C, H, W), MLP activation (B, H, W, 4C) after GELU, before GRN), computed with plain
    functional ops from the weights (no module forward of the blocks is called)."""
    feats = []
    x = model.stem[0](x)
    x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], model.stem[1].weight, model.stem[1].bias,
                     model.stem[1].eps).permute(0, 3, 1, 2)
    for i, stage in enumerate(model.stages):
        if i > 0:
            ln, conv = stage.downsample
            x = conv(F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2))
        for blk in stage.blocks:
            y = blk.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
            y = F.layer_norm(y, y.shape[-1:], blk.norm.weight, blk.norm.bias, blk.norm.eps)
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
            h = F.gelu(F.linear(y, fc1.weight.flatten(1), fc1.bias))  # (B, H, W, 4C)
            act = h.clone()
            if blk.mlp.grn is not None:
                g = h.norm(p=2, dim=(1, 2), keepdim=True)
                h = blk.mlp.grn.weight * (h * (g / (g.mean(-1, keepdim=True) + blk.mlp.grn.eps))) + blk.mlp.grn.bias + h
            y = F.linear(h, fc2.weight.flatten(1), fc2.bias)
            if blk.gamma is not None:
                y = y * blk.gamma
            x = x + y.permute(0, 3, 1, 2)
            feats.append((x, act))
    return feats


@pytest.mark.parametrize("name", ["test_convnextv2", "test_convnext"])
@pytest.mark.parametrize("grad", [False, True])
def test_collapse_distance_equals_explicit_forward(name, grad):
    m = _model(name)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ref = _explicit_features(m, x)
    ref_block = [pairwise_cosine_distance(o.permute(0, 2, 3, 1)).mean().item() for o, _ in ref]
    ref_mlp = [pairwise_cosine_distance(a).mean().item() for _, a in ref]
    with torch.set_grad_enabled(grad):
        mlp = [r["distance"] for r in feature_collapse(m, x, "mlp", batch_size=2)]
        block = [r["distance"] for r in feature_collapse(m, x, "block", batch_size=2)]
    assert len(mlp) == len(ref_mlp) == sum(m.depths)
    assert min(mlp) > 0.05  # the regression read 0.0 for every layer
    assert mlp == pytest.approx(ref_mlp, rel=1e-4, abs=1e-6)
    assert block == pytest.approx(ref_block, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_feature_points_read_the_explicit_activations(grad):
    """The hook points ``ConvNeXt.feature_modules`` give exactly the explicit forward's tensors, grad on and off."""
    # float64: the explicit forward sums in another order than the modules, and float32 rounding of that order
    # reaches 1.6e-5 with 2 threads; in float64 any real difference (a skipped op) still shows at 1e-5
    m = _model().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = _explicit_features(m, x)
    got = {"block": [], "mlp": []}
    hooks = [mod.register_forward_hook(lambda mod, i, o, w=where: got[w].append(o.detach().clone()))
             for where in got for _, mod in m.feature_modules(where)]
    try:
        with torch.set_grad_enabled(grad):
            m.forward_features(x.requires_grad_(grad))
    finally:
        for h in hooks:
            h.remove()
    assert len(got["block"]) == len(got["mlp"]) == len(ref)
    for (out, act), blk, mlp in zip(ref, got["block"], got["mlp"]):
        torch.testing.assert_close(blk, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp, act, rtol=1e-5, atol=1e-5)


def test_a_feature_point_the_forward_skips_is_an_error_not_zero(monkeypatch):
    from maskconv.layers import Mlp

    def hidden_without_act_module(self, x, masked=None):  # the old fast path: GELU as a function, not the module
        x = F.gelu(self.fc1(x))
        return self.grn(x) if self.grn is not None else x

    monkeypatch.setattr(Mlp, "hidden", hidden_without_act_module)
    with pytest.raises(RuntimeError, match="skipped a documented 'mlp' feature point"):
        feature_collapse(_model("test_convnext"), torch.randn(2, 3, 64, 64), "mlp")
    with pytest.raises(ValueError, match="where='grn'"):
        feature_collapse(_model("test_convnext"), torch.randn(2, 3, 64, 64), "grn")
