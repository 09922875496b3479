"""The ConvNeXt roadmap family: both ends are the published networks, every step builds and trains, its compute
matches the paper's, and each step changes exactly the modules the paper names."""
import re

import pytest
import torch
import torch.nn as nn

import maskconv
from maskconv.api import count_macs
from maskconv.models.roadmap import ROADMAP, RoadmapNet, step_kwargs, step_model_name, torchvision_state_dict
from tests.conftest import perturbed_state_dict

NAMES = [step_model_name(i) for i in range(len(ROADMAP))]


def _torchvision_resnet50():
    """torchvision's ResNet-50 with its own init and random BN statistics / affines (eval mode: BN is not the
    identity, so every tensor of the state dict matters), logits of order 1."""
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet50()
    g = torch.Generator().manual_seed(0)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.2 + 0.3 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return tv.eval()


def test_registered_names_and_order():
    assert maskconv.list_models("roadmap_*") == NAMES
    assert NAMES[0] == "roadmap_00_resnet50" and NAMES[-1] == "roadmap_16_convnext_tiny"


def test_step0_is_torchvision_resnet50():
    torchvision = pytest.importorskip("torchvision")
    tv = _torchvision_resnet50()
    ours = maskconv.create_model("roadmap_00_resnet50").eval()
    report = maskconv.load_checkpoint(ours, tv.state_dict(), strict=True)  # torchvision -> ours
    assert report.layout == "torchvision" and report.loaded == len(tv.state_dict())
    back = torchvision.models.resnet50().eval()
    back.load_state_dict(torchvision_state_dict(ours), strict=True)  # ours -> torchvision
    # same modules: as many convs (+ our Linear-stored 1x1 convs), BNs and max pools; the shapes are checked by the
    # strict loads above
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.Linear)
    n_tv = {k: sum(isinstance(m, k) for m in tv.modules()) for k in kinds}
    n_ours = {k: sum(isinstance(m, k) for m in ours.modules()) for k in kinds}
    # torchvision reuses one ReLU module per bottleneck three times; ours has one per use
    assert n_ours[nn.BatchNorm2d] == n_tv[nn.BatchNorm2d] and n_ours[nn.MaxPool2d] == n_tv[nn.MaxPool2d] == 1
    assert n_ours[nn.Conv2d] + n_ours[nn.Linear] == n_tv[nn.Conv2d] + n_tv[nn.Linear]
    for shape in [(2, 3, 64, 96), (1, 3, 65, 97)]:  # non-square; odd sizes work as in torchvision
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = tv(x)
            assert ref.abs().max() > 0.1  # logits of order 1, so the bound below is a tight relative one
            assert (ours(x) - ref).abs().max().item() <= 1e-5
            assert (back(x) - ref).abs().max().item() <= 1e-5


def test_last_step_is_timm_convnext_tiny():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("convnext_tiny", pretrained=False).eval()
    sd = perturbed_state_dict(ref)  # non-zero biases and layer scales so every parameter matters
    ref.load_state_dict(sd)
    ours = maskconv.create_model("roadmap_16_convnext_tiny").eval()
    ours.load_state_dict(sd, strict=True)  # timm -> ours
    assert maskconv.load_checkpoint(ours, sd).layout == "timm"
    ref2 = timm.create_model("convnext_tiny", pretrained=False).eval()
    ref2.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
    mc = maskconv.create_model("convnext_tiny")  # and the library's own ConvNeXt-T
    assert {k: v.shape for k, v in mc.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a = ours(x)
        assert (a - ref(x)).abs().max().item() <= 1e-5
        assert (ref2(x) - a).abs().max().item() <= 1e-5
    assert ours.feature_info == mc.feature_info


@pytest.mark.parametrize("name", NAMES)
def test_every_step_forward_backward(name):
    m = maskconv.create_model(name, num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 96)  # non-square
    out = m(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    m.eval()
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 32, 64), intermediates_only=True)
    assert [f.shape[1] for f in feats] == [fi["num_chs"] for fi in m.feature_info]
    assert [(32 // f.shape[2], 64 // f.shape[3]) for f in feats] == [(fi["reduction"],) * 2 for fi in m.feature_info]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_step_at_224(name):
    m = maskconv.create_model(name)
    out = m(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("index", [i for i, s in enumerate(ROADMAP) if s.gflops is not None])
def test_gflops_match_the_paper(index):
    # The paper's "GFLOPs" are fvcore multiply-adds rounded to 0.1 G: rounding alone is up to ±0.05 G (±2.1% at
    # 2.4 G, the smallest figure); fvcore also counts BN/LN and pooling elementwise work (< 1%), which
    # FlopCounterMode (convs and matmuls) does not. 3% covers both and no more: one block more or less in stage 3
    # (0.22 G) or a dense instead of depthwise spatial conv is far outside it.
    with torch.device("meta"):
        m = maskconv.create_model(step_model_name(index))
    gmacs = count_macs(m, 224) / 1e9
    paper = ROADMAP[index].gflops
    assert abs(gmacs / paper - 1) <= 0.03, f"{step_model_name(index)}: {gmacs:.3f} GMACs vs paper {paper} G"


def _structure(model: nn.Module) -> dict[str, str]:
    """Every module (type and its configuration, children excluded) and every parameter a module holds directly."""
    out = {}
    for name, mod in model.named_modules():
        out[name or "<root>"] = f"{type(mod).__name__}({mod.extra_repr()})"
        for pname, p in mod.named_parameters(recurse=False):
            out[f"{name}.{pname}"] = str(tuple(p.shape))
    return out


@pytest.mark.parametrize("index", range(1, len(ROADMAP)))
def test_each_step_changes_exactly_the_modules_the_paper_says(index):
    step = ROADMAP[index]
    with torch.device("meta"):
        a = _structure(RoadmapNet(**step_kwargs(step.parent)))
        b = _structure(RoadmapNet(**step_kwargs(index)))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "<root>")
    assert changed, f"step {index} changes nothing"
    patterns = [re.compile(p + r"(\.|$)") for p in step.modules]
    stray = [k for k in changed if not any(p.match(k) for p in patterns)]
    assert not stray, f"step {index} ({step.change}) also changes {stray[:6]}"
    unused = [p.pattern for p in patterns if not any(p.match(k) for k in changed)]
    assert not unused, f"step {index} ({step.change}) leaves {unused} unchanged"


def test_structural_diffs_name_the_paper_changes():
    """Spot checks of what each diff contains, beyond 'only these modules'."""
    def net(i):
        with torch.device("meta"):
            return RoadmapNet(**step_kwargs(i))

    r50, ratio, patch, dw = net(0), net(1), net(2), net(3)
    assert [len(s.blocks) for s in r50.stages] == [3, 4, 6, 3] and [len(s.blocks) for s in ratio.stages] == [3, 3, 9, 3]
    assert [type(m).__name__ for m in patch.stem] == ["Conv2d"] and patch.stem[0].kernel_size == (4, 4) == patch.stem[0].stride
    assert all(b.conv_dw.groups == b.conv_dw.in_channels for s in dw.stages for b in s.blocks)
    inv, up, k7 = net(5), net(6), net(8)
    blk = inv.stages[0].blocks[1]
    assert (blk.mlp.fc1.in_features, blk.mlp.fc1.out_features, blk.conv_dw.in_channels) == (96, 384, 384)
    assert up.stages[0].blocks[1].conv_dw.in_channels == 96 and k7.stages[0].blocks[1].conv_dw.kernel_size == (7, 7)
    gelu, acts, norms, ln, sep = net(11), net(12), net(13), net(14), net(15)
    assert not any(isinstance(m, nn.ReLU) for m in gelu.modules())
    assert sum(isinstance(m, nn.GELU) for m in acts.modules()) == 18  # one per block
    assert sum(isinstance(m, nn.BatchNorm2d) for m in norms.modules()) == 18 + 3  # one per block + 3 shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ln.modules())
    assert all(isinstance(s.blocks[0].shortcut, nn.Identity) for s in sep.stages)
    assert sep.head.norm.weight.shape == (768,) and len(sep.stem) == 2


def test_torchvision_weights_into_another_step_are_refused():
    tv = _torchvision_resnet50()
    m = maskconv.create_model("roadmap_03_depthwise")
    with pytest.raises(maskconv.CheckpointError, match="shape mismatch.*conv_dw"):
        maskconv.load_checkpoint(m, tv.state_dict())


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="stem="):
        RoadmapNet(stem="conv")
    with pytest.raises(ValueError, match="kernel_size=4"):
        RoadmapNet(kernel_size=4)
    with pytest.raises(ValueError, match="roadmap step 17 does not exist"):
        step_kwargs(17)
    m = maskconv.create_model("roadmap_15_sep_downsample", num_classes=3)
    with pytest.raises(ValueError, match="not divisible by .*32"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="in_chans=3"):
        m(torch.randn(1, 1, 64, 64))
    p = maskconv.create_model("roadmap_02_patchify", num_classes=3)
    assert p.stride == 32 and p(torch.randn(1, 3, 36, 44)).shape == (1, 3)  # patchify: multiples of 4 suffice
    with pytest.raises(ValueError, match="not divisible by .*4"):
        p(torch.randn(1, 3, 34, 44))


def test_contract_small_input_in_chans_and_patch_size():
    m = maskconv.create_model("roadmap_08_kernel7", in_chans=1, num_classes=10, patch_size=2)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)  # Fashion-MNIST at 32 px: maps 16, 8, 4, 2
    assert m.feature_info[-1]["reduction"] == 16
    r = maskconv.create_model("roadmap_00_resnet50", in_chans=1, num_classes=10, patch_size=2)
    assert not any(isinstance(x, nn.MaxPool2d) for x in r.stem) and r(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    m.reset_classifier(0)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, m.num_features)
    last = maskconv.create_model("roadmap_16_convnext_tiny")
    assert last.no_weight_decay() == {n for n, _ in last.named_parameters() if n.endswith("gamma")} != set()
    assert last.layer_id("stages.2.blocks.4.conv_dw.weight") == 3 + 3 + 4 + 1 and last.layer_id("head.fc.bias") == 19


@pytest.mark.parametrize("index", range(len(ROADMAP)))
def test_width_mult_narrows_every_step_alike(index):
    """``width_mult`` (``model.width_mult``) scales the base width of each step, so a narrow roadmap keeps every
    step's own change: ResNeXt-ify's 64 -> 96 stays a 1.5x widening, the others keep their parent's width."""
    with torch.device("meta"):
        full = maskconv.create_model(step_model_name(index))
        narrow = maskconv.create_model(step_model_name(index), width_mult=0.25)
    base = step_kwargs(index).get("width", 64)
    assert narrow.dims == [d * round(base / 4) // base for d in full.dims]
    assert [n for n, _ in narrow.named_modules()] == [n for n, _ in full.named_modules()]


def test_width_mult_reaches_the_model_through_the_config_and_is_refused_elsewhere():
    from maskconv.config import load_config
    from maskconv.models import architecture_kwargs
    from maskconv.rebuild import model_kwargs

    cfg = load_config(None, ["model.name=roadmap_04_width96", "model.width_mult=0.25", "model.stem_stride=2"])
    kw = model_kwargs(cfg)
    assert kw["width_mult"] == 0.25 and kw["patch_size"] == 2
    with torch.device("meta"):
        assert maskconv.create_model(cfg.model.name, **kw).dims[0] == 4 * 24  # bottleneck 96 / 4, output 4x (not inverted yet)
    assert architecture_kwargs("convnextv2_atto") == {}
    with pytest.raises(ValueError, match="model.width_mult=0.5: convnextv2_atto has no width multiplier"):
        architecture_kwargs("convnextv2_atto", width_mult=0.5)
    with pytest.raises(ValueError, match="model.width_mult.*> 0"):
        load_config(None, ["model.name=roadmap_04_width96", "model.width_mult=0"])
