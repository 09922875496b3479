"""The one channel MLP (layers/mlp.py): in-place GELU only without autograd, conv == linear weights, layouts."""
import pytest
import torch
import torch.nn.functional as F

from maskconv.layers import GELU, Mlp


def test_inplace_gelu_same_bits_and_only_without_autograd():
    x = torch.randn(2, 5, 5, 16)
    ref = F.gelu(x)
    act = GELU(inplace=True)
    with torch.no_grad():
        y = x.clone()
        out = act(y)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, ref)  # written into the input's buffer
    xg = x.clone().requires_grad_(True)
    out = act(xg)
    assert out.data_ptr() != xg.data_ptr() and torch.equal(out, ref)  # autograd: out of place
    out.sum().backward()
    with torch.no_grad():
        y = x.clone()
        assert GELU()(y).data_ptr() != y.data_ptr()  # not in place unless asked


@pytest.mark.parametrize("use_grn", [False, True])
def test_conv_and_linear_weights_compute_the_same(use_grn):
    torch.manual_seed(0)
    lin, conv = Mlp(8, 32, use_grn=use_grn), Mlp(8, 32, use_grn=use_grn, use_conv=True)
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in lin.state_dict().items()}
    lin.load_state_dict(sd)
    conv.load_state_dict({k: v.view(*v.shape, 1, 1) if k.endswith("weight") and "fc" in k else v for k, v in sd.items()})
    x = torch.randn(2, 6, 6, 8)
    torch.testing.assert_close(conv(x), lin(x), rtol=1e-5, atol=1e-6)
    tokens = x.reshape(2, -1, 1, 8) if use_grn else x.reshape(-1, 8)  # GRN: per-sample (B, L, 1, C) view
    torch.testing.assert_close(conv(tokens), lin(tokens), rtol=1e-5, atol=1e-6)


def test_channels_first_maps_equal_channels_last_and_masked_cells_leave_grn_stats():
    torch.manual_seed(0)
    cf = Mlp(8, 16, use_conv=True, channels_first=True)
    cl = Mlp(8, 16, use_conv=True)
    cl.load_state_dict(cf.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(cf(x), cl(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels_first"):
        Mlp(8, 16, use_grn=True, use_conv=True, channels_first=True)
    # masked cells are zeroed before GRN: the visible outputs equal GRN over the visible cells alone
    g = Mlp(8, 16, use_grn=True)
    with torch.no_grad():
        g.grn.weight.normal_()
    x = torch.randn(1, 4, 4, 8)
    masked = torch.zeros(1, 4, 4, 1, dtype=torch.bool)
    masked[:, 2:] = True
    out = g(x, masked)
    torch.testing.assert_close(out[:, :2], g(x[:, :2]), rtol=1e-5, atol=1e-6)
