"""Large-kernel layers: conv-BN folding, centred padding, branch merging (SLaK decomposed, RepLKNet)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskconv.export import reparameterize_model
from maskconv.layers import ConvBN, DecomposedLargeKernelConv, ReparamLargeKernelConv, pad_kernel_to


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN running statistics and affine parameters, so folding them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))


def test_convbn_fuse_equals_conv_then_bn():
    m = ConvBN(6, 10, (5, 3), stride=2, groups=2)
    randomize_bn(m)
    m.eval()
    x = torch.randn(2, 6, 13, 11)
    k, b = m.fuse()
    # "same" padding (k_h//2, k_w//2), as SLaK's implicit-GEMM conv
    assert m.conv.padding == (2, 1) and m.conv.bias is None
    torch.testing.assert_close(F.conv2d(x, k, b, stride=2, padding=(2, 1), groups=2), m(x), rtol=0, atol=1e-5)


def test_convbn_act_is_relu_named_as_official():
    m = ConvBN(3, 4, 3, act=True)
    assert [n for n, _ in m.named_children()] == ["conv", "bn", "nonlinear"]
    assert (m.eval()(torch.randn(1, 3, 8, 8)) >= 0).all()


def test_pad_kernel_to_centres_and_rejects_bad_sizes():
    k = torch.arange(15.0).reshape(1, 1, 5, 3)
    p = pad_kernel_to(k, 7)
    assert p.shape == (1, 1, 7, 7)
    assert torch.equal(p[..., 1:6, 2:5], k) and p.sum() == k.sum()
    assert p[0, 0, 3, 3] == k[0, 0, 2, 1]  # centre tap stays at the centre
    with pytest.raises(ValueError, match="odd"):
        pad_kernel_to(k, 6)
    with pytest.raises(ValueError, match="not larger"):
        pad_kernel_to(k, 3)


def test_decomposed_branches_have_official_names_and_shapes():
    m = DecomposedLargeKernelConv(4, 13, 5)
    sd = m.state_dict()
    assert sd["LoRA1.conv.weight"].shape == (4, 1, 13, 5)
    assert sd["LoRA2.conv.weight"].shape == (4, 1, 5, 13)
    assert sd["small_conv.conv.weight"].shape == (4, 1, 5, 5)
    assert "LoRA1.bn.running_var" in sd and m.LoRA1.conv.padding == (6, 2) and m.LoRA2.conv.padding == (2, 6)
    assert DecomposedLargeKernelConv(4, 5, 5).small_conv is None  # N == M: no separate small kernel
    r = ReparamLargeKernelConv(4, 13, 5).state_dict()
    assert r["lkb_origin.conv.weight"].shape == (4, 1, 13, 13) and r["small_conv.conv.weight"].shape == (4, 1, 5, 5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_decomposed_is_sum_of_branches_in_training(channels_last):
    """Outputs and gradients equal the plain sum of the three conv-BN branches (the CPU training path computes
    LoRA2 on the transposed map; only float rounding may differ, hence 1e-6)."""
    m = DecomposedLargeKernelConv(3, 7, 3).train()
    randomize_bn(m)
    x = torch.randn(2, 3, 9, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = torch.randn(2, 3, 9, 12)
    ref_mod = copy.deepcopy(m)
    expect = ref_mod.LoRA1(x) + ref_mod.LoRA2(x) + ref_mod.small_conv(x)
    out = m(x)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    ref = torch.autograd.grad(expect, [x, *ref_mod.parameters()], g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(m.buffers(), ref_mod.buffers()):  # BN running statistics updated alike
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [lambda: DecomposedLargeKernelConv(6, 13, 5), lambda: DecomposedLargeKernelConv(5, 51, 5),
     lambda: DecomposedLargeKernelConv(4, 7, 7), lambda: ReparamLargeKernelConv(6, 13, 5),
     lambda: ReparamLargeKernelConv(4, 9, None), lambda: ReparamLargeKernelConv(4, 7, 7)],
    ids=["slak13x5", "slak51x5", "slak_no_small", "replk13+5", "replk_no_small", "replk_small_eq"],
)
def test_reparameterize_same_output_single_merged_conv(make):
    m = make()
    randomize_bn(m)
    m.eval()
    x = torch.randn(2, m.LoRA1.conv.in_channels if hasattr(m, "LoRA1") else m.lkb_origin.conv.in_channels, 20, 27)
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs == [m.lkb_reparam]
    c, k = x.shape[1], m.kernel_size
    assert m.lkb_reparam.weight.shape == (c, 1, k, k) and m.lkb_reparam.groups == c
    assert m.lkb_reparam.bias is not None and m.lkb_reparam.padding == (k // 2, k // 2)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert sorted(m.state_dict()) == ["lkb_reparam.bias", "lkb_reparam.weight"]
    m.reparameterize()  # a second call changes nothing
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)


def test_reparameterize_model_walks_nested_modules():
    net = nn.Sequential(DecomposedLargeKernelConv(3, 9, 3), nn.ReLU(), ReparamLargeKernelConv(3, 7, 3))
    randomize_bn(net)
    net.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        reparameterize_model(net)
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert net[0].lkb_reparam is not None and net[2].lkb_reparam is not None


def test_merged_kernel_matches_a_hand_built_one():
    """Independent of get_equivalent_kernel_bias: build the M×M kernel by writing the branch kernels into place."""
    m = DecomposedLargeKernelConv(2, 7, 3)
    randomize_bn(m, seed=3)
    m.eval()
    want = torch.zeros(2, 1, 7, 7)
    bias = torch.zeros(2)
    for branch, (rows, cols) in ((m.LoRA1, (slice(0, 7), slice(2, 5))), (m.LoRA2, (slice(2, 5), slice(0, 7))),
                                 (m.small_conv, (slice(2, 5), slice(2, 5)))):
        bn = branch.bn
        s = bn.weight / (bn.running_var + bn.eps).sqrt()
        want[:, :, rows, cols] += branch.conv.weight.detach() * s.detach().reshape(-1, 1, 1, 1)
        bias += (bn.bias - bn.running_mean * s).detach()
    m.reparameterize()
    torch.testing.assert_close(m.lkb_reparam.weight.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.lkb_reparam.bias.detach(), bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel, small, match", [(8, 3, "kernel_size=8"), (7, 4, "small_kernel=4"),
                                                  (5, 7, "no larger")])
def test_bad_kernel_sizes_are_clear_errors(kernel, small, match):
    with pytest.raises(ValueError, match=match):
        DecomposedLargeKernelConv(4, kernel, small)
    with pytest.raises(ValueError, match=match):
        ReparamLargeKernelConv(4, kernel, small)
