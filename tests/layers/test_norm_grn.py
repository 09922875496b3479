"""LayerNorm2d / GRN: formulas of the ConvNeXt (arXiv:2201.03545) and ConvNeXt V2 (arXiv:2301.00808, Alg. 1)
papers, and fp16 safety."""
import pytest
import torch

from maskconv.layers import GlobalResponseNorm, LayerNorm, LayerNorm2d


def test_layernorm2d_normalises_over_channels_per_position():
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 7)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)  # biased variance over C only (not C,H,W: ConvNeXt#112)
    ref = (x - u) / torch.sqrt(s + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ln(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)


def test_grn_matches_official_dense_formula():
    grn = GlobalResponseNorm(8)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(3, 5, 4, 8)  # (B, H, W, C)
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # per sample and channel
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    ref = grn.weight * (x * nx) + grn.bias + x
    torch.testing.assert_close(grn(x), ref, rtol=1e-5, atol=1e-5)


def test_grn_is_identity_at_init_and_per_sample():
    grn = GlobalResponseNorm(4)
    x = torch.randn(2, 3, 3, 4)
    assert torch.equal(grn(x), x)
    with torch.no_grad():
        grn.weight.fill_(1.0)
    y = grn(x)
    x2 = x.clone()
    x2[1] *= 100  # another sample's scale must not change sample 0 (per-sample statistics)
    assert torch.allclose(grn(x2)[0], y[0])


def test_fp16_does_not_overflow_where_fp32_does_not():
    # Sum of squares over 64x64 positions of activations ~ 50 is ~1e7: overflows fp16 (max 65504) if computed
    # in fp16, which is the upstream fp16 ConvNeXt V2 failure (ConvNeXt-V2#66).
    grn = GlobalResponseNorm(16)
    with torch.no_grad():
        grn.weight.fill_(0.5)
    x = 50 * torch.randn(2, 64, 64, 16)
    ref = grn(x)
    half = grn.half()(x.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), ref, rtol=1e-2, atol=0.5)  # fp16 has ~3 decimal digits

    ln = LayerNorm(16)
    y = 300 * torch.randn(4, 16)  # variance ~9e4 > fp16 max
    out = ln.half()(y.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), LayerNorm(16)(y), rtol=1e-2, atol=1e-2)


def test_grn_gradient_finite_for_all_zero_channel():
    grn = GlobalResponseNorm(4)
    with torch.no_grad():
        grn.weight.fill_(1.0)
    x = torch.randn(2, 3, 3, 4)
    x[:, :, :, 1] = 0  # e.g. a channel that is zero at every visible position
    x.requires_grad_(True)
    grn(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(grn.weight.grad).all()


def test_grn_keeps_input_dtype_under_autocast():
    grn = GlobalResponseNorm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grn(torch.randn(2, 3, 3, 8).bfloat16())
    assert y.dtype == torch.bfloat16


def _plain_grn(x, weight, bias, eps=1e-6):
    """The official dense formula, differentiated by autograd: the reference for the hand-written backward."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    return weight * (x * (gx / (gx.mean(dim=-1, keepdim=True) + eps))) + bias + x


@pytest.mark.parametrize("sumsq_stats", [False, True])
def test_grn_forward_and_gradients_match_plain_autograd(sumsq_stats):
    # GRN trains through a hand-written backward (grn.py): it must give the values and the input, weight and
    # bias gradients that autograd gives through the plain formula, including a channel whose norm is 0
    # (gradient 0 there, as torch's norm backward), for both ways of taking the statistics.
    torch.manual_seed(0)
    grn = GlobalResponseNorm(6, sumsq_stats=sumsq_stats)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    w, b = (p.detach().clone().requires_grad_(True) for p in (grn.weight, grn.bias))
    x = torch.randn(2, 5, 4, 6)
    x[1, :, :, 2] = 0
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(2, 5, 4, 6)
    ys = [grn(xs[0]), _plain_grn(xs[1], w, b)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-6, atol=1e-6)  # fp32: only the reduction order differs
    for y in ys:
        y.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grn.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grn.bias.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(xs[0].grad).all()


@pytest.mark.parametrize("sumsq_stats", [False, True])
def test_grn_backward_passes_gradcheck_in_float64(sumsq_stats):
    torch.manual_seed(0)
    grn = GlobalResponseNorm(5, sumsq_stats=sumsq_stats).double()
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: GlobalResponseNorm.forward(_Params(grn, w, b), x),
                                    (x, grn.weight, grn.bias))


class _Params:
    """Stand-in ``self`` so gradcheck can pass weight and bias as explicit inputs."""

    def __init__(self, grn, weight, bias):
        self.eps, self.sumsq_stats, self.weight, self.bias = grn.eps, grn.sumsq_stats, weight, bias


def test_grn_forward_is_bit_identical_with_and_without_grad():
    # training (custom Function) and inference (direct call) run the same forward ops: same bits
    grn = GlobalResponseNorm(8, sumsq_stats=True)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(2, 7, 7, 8)
    y_train = grn(x.clone().requires_grad_(True))
    with torch.inference_mode():
        y_infer = grn(x)
    assert torch.equal(y_train.detach(), y_infer)


def test_grn_bf16_gradients_follow_fp32():
    torch.manual_seed(0)
    grn = GlobalResponseNorm(8)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(2, 6, 6, 8)
    g = torch.randn(2, 6, 6, 8)
    grads = []
    for dt in (torch.float32, torch.bfloat16):
        grn.zero_grad()
        xi = x.to(dt).detach().requires_grad_(True)
        grn(xi).backward(g.to(dt))
        assert xi.grad.dtype == dt and grn.weight.grad.dtype == torch.float32
        grads.append((xi.grad.float(), grn.weight.grad.clone()))
    # bf16 keeps ~3 significant digits: compare at that precision
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=3e-2, atol=3e-2)
