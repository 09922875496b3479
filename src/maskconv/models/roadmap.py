"""The ConvNeXt roadmap: ResNet-50 modernised into ConvNeXt-T one design choice at a time.

Paper: "A ConvNet for the 2020s" (Liu et al., CVPR 2022, arXiv:2201.03545), Section 2 ("Modernizing a ConvNet: a
Roadmap", Figure 2; Figure 3 for the inverted bottleneck, Figure 4 for the block at each end; the appendix tabulates
every step's result). The official repo (facebookresearch/ConvNeXt) has no code for the intermediate networks: the
steps are transcribed from the paper's text, one switch of ``RoadmapNet`` per step (``ROADMAP`` below).

One module naming across all steps, so two neighbouring steps can be compared module by module and the last step's
state dict *is* timm's ``convnext_tiny``'s: ``stem``, ``stages.i.downsample``, ``stages.i.blocks.j`` with
``conv_dw`` (the k×k spatial conv; dense until the ResNeXt step), ``norm`` (after it), ``mlp.fc1`` / ``mlp.fc2``
(the first / second 1×1 conv, stored as Linear weights like timm's), ``mlp.norm1`` / ``mlp.norm2`` (the norms after
them), ``mlp.act`` / ``act_dw`` / ``act_out`` (activations after fc1, after the spatial conv, after the residual
add), ``shortcut`` (ResNet's projection), ``gamma`` (layer scale), ``head.norm`` / ``head.fc``.
Step 0 is torchvision's ``resnet50`` module for module; ``checkpoint_filter_fn`` maps its keys (conv1, layer1.0.conv2,
fc ...) to these and ``torchvision_state_dict`` maps them back.

Choices the paper leaves open (docs/DECISIONS.md): a conv has a bias iff no BatchNorm follows it (what makes both
ends exact); the "patchify" stem is the 4×4/s4 conv alone until the separate-downsampling step adds "one [LN] after
the stem" (Section 2.6); before that step the first block of stages 2-4 downsamples with stride 2 in its spatial conv
and a strided 1×1 shortcut conv + norm (torchvision's ResNet-50 v1.5); the "inverted" block's residual width is the
old bottleneck width (Figure 3 (a)->(b): 384->96->384 becomes 96->384->96).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from ..layers import LayerNorm, LayerNorm2d
from ._features import check_image_input
from ._registry import register_checkpoint_filter, register_model
from .convnext import ConvNeXt, ConvNeXtStage

__all__ = ["ROADMAP", "RoadmapNet", "RoadmapStep", "checkpoint_filter_fn", "step_kwargs", "step_model_name",
           "torchvision_state_dict"]

_NORMS = ("bn", "ln")
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _norm(kind: str, dim: int) -> nn.Module:
    # BN: torchvision's BatchNorm2d (eps 1e-5); LN over channels at every position: ConvNeXt's (eps 1e-6)
    return nn.BatchNorm2d(dim) if kind == "bn" else LayerNorm2d(dim)


def _init_weights(m: nn.Module) -> None:
    """ConvNeXt's init (official ``_init_weights``) at every step: trunc-normal(.02) conv / linear weights, zero bias."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _pointwise(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H, W)
    """A 1×1 conv stored as Linear weights (timm's ConvNeXt layout), on the NHWC view (free for channels_last)."""
    return F.linear(x.permute(0, 2, 3, 1), fc.weight, fc.bias).permute(0, 3, 1, 2)


class RoadmapMlp(nn.Module):
    """The block's two 1×1 convs with their norms and the activation after the first. ``first``/``second`` are
    called separately: in ResNet order the spatial conv sits between them."""

    def __init__(self, in_chs: int, hidden: int, out_chs: int, norm: str, act: str, fewer_norms: bool):
        super().__init__()
        bn = norm == "bn" and not fewer_norms  # a conv followed by BN has no bias (BN's shift absorbs it)
        self.fc1 = nn.Linear(in_chs, hidden, bias=not bn)
        self.norm1 = nn.Identity() if fewer_norms else _norm(norm, hidden)
        self.act = _ACTS[act]()
        self.fc2 = nn.Linear(hidden, out_chs, bias=not bn)
        self.norm2 = nn.Identity() if fewer_norms else _norm(norm, out_chs)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm1(_pointwise(x, self.fc1)))

    def second(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(_pointwise(x, self.fc2))


class RoadmapBlock(nn.Module):
    """ResNet bottleneck (``inverted=False``: in -> w -> k×k w -> 4w) or inverted bottleneck (in -> 4d -> k×k 4d
    -> d), spatial conv in the middle or first (``dw_first``), with the micro-design switches of Section 2.6."""

    def __init__(self, in_chs: int, dim: int, stride: int, kernel_size: int, depthwise: bool, inverted: bool,
                 dw_first: bool, act: str, fewer_acts: bool, fewer_norms: bool, norm: str,
                 ls_init_value: float | None, drop_path: float):
        super().__init__()
        hidden, out_chs = (4 * dim, dim) if inverted else (dim, 4 * dim)
        spatial = in_chs if dw_first else hidden  # channels the spatial conv sees
        self.dw_first = dw_first
        self.conv_dw = nn.Conv2d(spatial, spatial, kernel_size, stride=stride, padding=kernel_size // 2,
                                 groups=spatial if depthwise else 1, bias=norm != "bn")
        self.norm = _norm(norm, spatial)
        self.act_dw = nn.Identity() if fewer_acts else _ACTS[act]()
        self.mlp = RoadmapMlp(in_chs, hidden, out_chs, norm, act, fewer_norms)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(out_chs)) if ls_init_value else None
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.act_out = nn.Identity() if fewer_acts else _ACTS[act]()
        if stride != 1 or in_chs != out_chs:  # ResNet's projection shortcut (torchvision's ``downsample``)
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=norm != "bn"),
                                          _norm(norm, out_chs))
        else:
            self.shortcut = nn.Identity()

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_dw(self.norm(self.conv_dw(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        shortcut = self.shortcut(x)
        if self.dw_first:
            x = self.mlp.first(self._spatial(x))
        else:
            x = self._spatial(self.mlp.first(x))
        x = self.mlp.second(x)  # (B, C_out, H', W')
        if self.gamma is not None:
            x = x * self.gamma[:, None, None]
        return self.act_out(self.drop_path(x) + shortcut)


class RoadmapStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    forward = ConvNeXtStage.forward  # downsample, then the blocks (checkpointed when asked): same attributes


class RoadmapHead(nn.Module):
    """Global average pool -> [LayerNorm] -> dropout -> Linear (``head.norm`` / ``head.fc``, timm's keys)."""

    def __init__(self, in_features: int, num_classes: int, norm: bool, drop_rate: float):
        super().__init__()
        self.norm = LayerNorm(in_features) if norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, C, H, W)
        x = self.norm(x.mean((2, 3)))  # (B, C)
        return x if pre_logits else self.fc(self.drop(x))


class RoadmapNet(nn.Module):
    """One network per combination of the roadmap's switches (defaults: torchvision's ResNet-50).

    ``depths``: blocks per stage (Section 2.2 "stage ratio"); ``stem``: ``'resnet'`` (7×7/s2 conv, BN, ReLU, 3×3/s2
    max pool) or ``'patchify'`` (a ``patch_size``×``patch_size`` conv, stride ``patch_size``; Section 2.2);
    ``depthwise`` / ``width``: ResNeXt-ify (Section 2.3); ``inverted`` (2.4); ``dw_first``, ``kernel_size`` (2.5);
    ``act``, ``fewer_acts``, ``fewer_norms``, ``norm``, ``separate_downsample`` (2.6); ``ls_init_value``: layer scale
    (the training recipe's, Appendix A.1). ``patch_size``: the stem's stride (4 as in the paper; 2 or 1 for small
    images: the ResNet stem then drops its max pool, and at 1 its conv's stride). ``head_init_scale``, ``drop_rate``,
    ``drop_path_rate``: as ConvNeXt's. ``width_mult``: every step's ``width`` (64, or 96 from ResNeXt-ify on) times
    this, rounded: narrow copies that keep each step's change, for a CPU budget (1 = the paper's networks).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: tuple[int, ...] = (3, 4, 6, 3),
                 width: int = 64, stem: str = "resnet", depthwise: bool = False, inverted: bool = False,
                 dw_first: bool = False, kernel_size: int = 3, act: str = "relu", fewer_acts: bool = False,
                 fewer_norms: bool = False, norm: str = "bn", separate_downsample: bool = False,
                 ls_init_value: float | None = None, patch_size: int = 4, head_init_scale: float = 1.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg", width_mult: float = 1.0):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult={width_mult}: must be > 0")
        width = max(1, round(width * width_mult))
        if stem not in ("resnet", "patchify"):
            raise ValueError(f"stem={stem!r}: use 'resnet' or 'patchify'")
        if norm not in _NORMS or act not in _ACTS:
            raise ValueError(f"norm={norm!r} / act={act!r}: norm is one of {_NORMS}, act one of {tuple(_ACTS)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}: must be odd (padding k // 2 keeps the size)")
        if patch_size not in (1, 2, 4):
            raise ValueError(f"patch_size={patch_size}: use 4 (the paper), 2 or 1 (small images)")
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; the roadmap uses 'avg'")
        if in_chans < 1 or width < 1 or not depths or min(depths) < 1:
            raise ValueError(f"in_chans ({in_chans}), width ({width}) and every depth ({depths}) must be >= 1")
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.depths = tuple(depths)
        self.stride = patch_size * 2 ** (len(depths) - 1)  # total stride (as ConvNeXt's)
        # what the input size must divide by: patchify cuts whole patches, 2×2/s2 downsampling layers halve exactly;
        # ResNet's padded strided convs take any size (as torchvision's)
        self.input_multiple = self.stride if separate_downsample else (patch_size if stem == "patchify" else 1)
        if stem == "resnet":
            layers = [nn.Conv2d(in_chans, width, 7, stride=min(patch_size, 2), padding=3, bias=norm != "bn"),
                      _norm(norm, width), _ACTS[act]()]
            if patch_size == 4:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        else:  # the patchify layer alone; its LN comes with the separate downsampling layers (Section 2.6)
            layers = [nn.Conv2d(in_chans, width, patch_size, stride=patch_size)]
            if separate_downsample:
                layers.append(_norm(norm, width))
        self.stem = nn.Sequential(*layers)

        dp = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: works under a meta device
        block_kw = dict(kernel_size=kernel_size, depthwise=depthwise, inverted=inverted, dw_first=dw_first, act=act,
                        fewer_acts=fewer_acts, fewer_norms=fewer_norms, norm=norm, ls_init_value=ls_init_value)
        stages, prev, cursor = [], width, 0
        self.dims, self.feature_info = [], []
        for i, depth in enumerate(depths):
            dim = width * 2**i  # bottleneck width (ResNet) = residual width (inverted): 96 -> 96 (Figure 3)
            out = dim if inverted else 4 * dim
            downsample, stride = nn.Identity(), 2 if i > 0 else 1
            if separate_downsample and i > 0:  # LN before a 2×2/s2 conv between stages (Section 2.6)
                downsample, stride = nn.Sequential(_norm(norm, prev), nn.Conv2d(prev, out, 2, stride=2)), 1
                prev = out
            blocks = [RoadmapBlock(prev if j == 0 else out, dim, stride if j == 0 else 1,
                                   drop_path=dp[cursor + j], **block_kw) for j in range(depth)]
            stages.append(RoadmapStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=out, reduction=patch_size * 2**i, module=f"stages.{i}"))
            self.dims.append(out)
            prev, cursor = out, cursor + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        # the LN "after the final global average pooling" comes with the separate downsampling layers (Section 2.6)
        self.head = RoadmapHead(prev, num_classes, separate_downsample, drop_rate)
        self.apply(_init_weights)  # trunc_normal(.02) convs and linears, zero biases: ConvNeXt's init, every step
        if head_init_scale != 1.0 and isinstance(self.head.fc, nn.Linear):  # as ConvNeXt (fine-tuning recipes)
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    first_conv = "stem.0"

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor this step accepts."""
        check_image_input(x, self.in_chans, self.input_multiple, "this step's total stride")

    # Same stage / block naming as ConvNeXt, so its contract methods apply as they are (layer ids for layer-wise lr
    # decay: the official ConvNeXt optim_factory's, stem = layer 0).
    _stem = ConvNeXt._stem  # check_input, channels_last (the NHWC views of _pointwise are free), stem
    forward_features = ConvNeXt.forward_features
    forward_head = ConvNeXt.forward_head
    forward = ConvNeXt.forward
    reset_classifier = ConvNeXt.reset_classifier
    get_classifier = ConvNeXt.get_classifier
    no_weight_decay = ConvNeXt.no_weight_decay  # layer scales (``.gamma``)
    forward_intermediates = ConvNeXt.forward_intermediates
    fsdp_units = ConvNeXt.fsdp_units
    set_grad_checkpointing = ConvNeXt.set_grad_checkpointing
    group_matcher = ConvNeXt.group_matcher
    num_lr_layers = ConvNeXt.num_lr_layers
    layer_id = ConvNeXt.layer_id


# ---- the steps (Figure 2, top to bottom; Section 2.2-2.6) -----------------------------------------------------
@dataclass(frozen=True)
class RoadmapStep:
    """One bar of Figure 2: the switches that differ from ``parent`` and the paper's figures for it.

    ``gflops`` / ``top1``: ImageNet-1K, 224², the paper's "GFLOPs" (multiply-adds, fvcore's convention) and top-1
    (%); None where we are not sure of the figure. ``source``: where the figures are stated.
    """
    name: str
    change: str
    parent: int | None
    switches: dict = field(default_factory=dict)
    modules: tuple[str, ...] = ()  # module-name patterns (regex) that the paper's change touches
    gflops: float | None = None
    top1: float | None = None
    source: str = ""
    group: str = ""  # Figure 2's colour groups (Sections 2.2-2.6)


_BLOCK = r"stages\.\d+\.blocks\.\d+"
_DW = (rf"{_BLOCK}\.conv_dw",)
_MACRO, _NEXT, _INV, _LK, _MICRO = "macro design", "ResNeXt", "inverted bottleneck", "large kernel", "micro design"
_S = RoadmapStep
ROADMAP: tuple[RoadmapStep, ...] = (
    _S("resnet50", "ResNet-50 (torchvision), modern recipe", None, {}, (), 4.1, 78.8, "Sec. 2.1 text", "baseline"),
    _S("stage_ratio", "stage ratio (3,4,6,3) -> (3,3,9,3)", 0, dict(depths=(3, 3, 9, 3)),
       (r"stages\.1\.blocks\.3", r"stages\.2\.blocks\.[678]"), 4.5, 79.4, "Sec. 2.2 text, Fig. 2", _MACRO),
    _S("patchify", "'patchify' stem 4x4/s4", 1, dict(stem="patchify"), ("stem",), 4.4, 79.5, "Sec. 2.2 text, Fig. 2",
       _MACRO),
    _S("depthwise", "ResNeXt-ify: depthwise conv", 2, dict(depthwise=True), _DW, 2.4, 78.3, "Sec. 2.3 text", _NEXT),
    _S("width96", "ResNeXt-ify: width 64 -> 96", 3, dict(width=96), ("stem", "stages", "head"), 5.3, 80.5,
       "Sec. 2.3 text", _NEXT),
    _S("inverted", "inverted bottleneck", 4, dict(inverted=True), (rf"{_BLOCK}\.(conv_dw|norm|mlp|shortcut)", "head"),
       4.6, 80.6, "Sec. 2.4 text", _INV),
    _S("dw_up", "move up the depthwise conv", 5, dict(dw_first=True), (rf"{_BLOCK}\.(conv_dw|norm)",), 4.1, 79.9,
       "Sec. 2.5 text", _LK),
    _S("kernel5", "kernel size 3 -> 5", 6, dict(kernel_size=5), _DW, 4.1, None, "Fig. 2", _LK),
    _S("kernel7", "kernel size 3 -> 7", 6, dict(kernel_size=7), _DW, 4.2, 80.6, "Sec. 2.5 text, Fig. 2", _LK),
    _S("kernel9", "kernel size 3 -> 9", 6, dict(kernel_size=9), _DW, 4.2, None, "Fig. 2", _LK),
    _S("kernel11", "kernel size 3 -> 11", 6, dict(kernel_size=11), _DW, 4.3, None, "Fig. 2", _LK),
    # the micro design continues from the 7×7 network (Sec. 2.5: the benefit saturates at 7×7)
    _S("gelu", "ReLU -> GELU", 8, dict(act="gelu"), (rf"{_BLOCK}\.(act_dw|mlp\.act|act_out)",), 4.2, 80.6,
       "Sec. 2.6 text, Fig. 2", _MICRO),
    _S("fewer_acts", "fewer activations", 11, dict(fewer_acts=True), (rf"{_BLOCK}\.(act_dw|act_out)",), 4.2, 81.3,
       "Sec. 2.6 text, Fig. 2", _MICRO),
    _S("fewer_norms", "fewer norms", 12, dict(fewer_norms=True), (rf"{_BLOCK}\.mlp\.(fc1|fc2|norm1|norm2)",), 4.2,
       81.4, "Sec. 2.6 text, Fig. 2", _MICRO),
    _S("bn_to_ln", "BN -> LN", 13, dict(norm="ln"), (rf"{_BLOCK}\.(conv_dw|norm|shortcut)",), 4.2, 81.5,
       "Sec. 2.6 text, Fig. 2", _MICRO),
    _S("sep_downsample", "separate downsampling layers", 14, dict(separate_downsample=True),
       # the 2x2/s2 layers take over the stride and the channel change from the first blocks of stages 2-4
       ("stem", r"stages\.[123]\.downsample", r"stages\.[123]\.blocks\.0\.(conv_dw|norm|mlp\.fc1|shortcut)", "head"),
       4.5, 82.0,
       "Sec. 2.6 text, Fig. 2", _MICRO),
    _S("convnext_tiny", "ConvNeXt-T (+ layer scale 1e-6, App. A.1)", 15, dict(ls_init_value=1e-6),
       (rf"{_BLOCK}\.gamma",), 4.5, 82.0, "Sec. 2.6 text, Fig. 2", "ConvNeXt-T"),
)
SWIN_T = dict(gflops=4.5, top1=81.3)  # the reference bar of Figure 2 (Swin-T, 224², ImageNet-1K)


def step_kwargs(index: int) -> dict:
    """``RoadmapNet`` keyword arguments of step ``index`` (its parent's plus its own switches)."""
    if not 0 <= index < len(ROADMAP):
        raise ValueError(f"roadmap step {index} does not exist: steps are 0..{len(ROADMAP) - 1}")
    step = ROADMAP[index]
    base = {} if step.parent is None else step_kwargs(step.parent)
    return {**base, **step.switches}


def step_model_name(index: int) -> str:
    return f"roadmap_{index:02d}_{ROADMAP[index].name}"


def _register(index: int) -> None:
    def fn(**kw) -> RoadmapNet:
        return RoadmapNet(**{**step_kwargs(index), **kw})

    fn.__name__ = step_model_name(index)
    fn.__doc__ = f"Roadmap step {index}: {ROADMAP[index].change} (ConvNeXt paper, Figure 2)."
    register_model(fn)


for _i in range(len(ROADMAP)):
    _register(_i)


# ---- checkpoint layouts ---------------------------------------------------------------------------------------
_TV_BLOCK = {"conv1": "mlp.fc1", "bn1": "mlp.norm1", "conv2": "conv_dw", "bn2": "norm", "conv3": "mlp.fc2",
             "bn3": "mlp.norm2", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_TV_TOP = {"conv1": "stem.0", "bn1": "stem.1", "fc": "head.fc"}
_TV_RE = re.compile(r"layer(\d+)\.(\d+)\.(.+)\.(\w+)$")


def _from_tv(k: str) -> str:
    m = _TV_RE.match(k)
    if m:
        stage, block, mod, leaf = m.groups()
        if mod not in _TV_BLOCK:
            raise ValueError(f"unknown torchvision ResNet key {k!r}")
        return f"stages.{int(stage) - 1}.blocks.{block}.{_TV_BLOCK[mod]}.{leaf}"
    mod, _, leaf = k.rpartition(".")
    if mod not in _TV_TOP:
        raise ValueError(f"unknown torchvision ResNet key {k!r}")
    return f"{_TV_TOP[mod]}.{leaf}"


@register_checkpoint_filter(RoadmapNet)
def checkpoint_filter_fn(state_dict: dict, model: RoadmapNet) -> tuple[dict, str]:
    """A torchvision ResNet state dict (``conv1``, ``layerN.j.convK``, ``fc``; steps 0-1) or ours (= timm's keys;
    the last step's is timm's ``convnext_tiny``) -> ours. Returns ``(state_dict, 'torchvision' | 'timm')``.
    Reshape: torchvision's 1×1 convs (O, I, 1, 1) -> our Linear-stored ``mlp.fc1/fc2`` (O, I)."""
    if not any(k.startswith("layer1.") for k in state_dict):
        return dict(state_dict), "timm"
    out = {}
    for k, v in state_dict.items():
        new = _from_tv(k)
        if re.search(r"\.mlp\.fc[12]\.weight$", new) and v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v.flatten(1)
        out[new] = v
    return out, "torchvision"


def torchvision_state_dict(model: RoadmapNet) -> dict[str, torch.Tensor]:
    """The model's state dict in torchvision's ResNet keys (the inverse of ``checkpoint_filter_fn``): step 0's loads
    strict into ``torchvision.models.resnet50()``."""
    inverse_block = {v: k for k, v in _TV_BLOCK.items()}
    inverse_top = {v: k for k, v in _TV_TOP.items()}
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)$", k)
        mod, _, leaf = k.rpartition(".")
        if m and m.group(3) in inverse_block:
            new = f"layer{int(m.group(1)) + 1}.{m.group(2)}.{inverse_block[m.group(3)]}.{m.group(4)}"
        elif mod in inverse_top:
            new = f"{inverse_top[mod]}.{leaf}"
        else:
            raise ValueError(f"{k!r} has no torchvision ResNet counterpart (only ResNet-like steps map to torchvision)")
        out[new] = v[:, :, None, None] if re.search(r"\.conv[13]\.weight$", new) and v.ndim == 2 else v
    return out


# ---- tiny variant for fast tests (not a published architecture) ----------------------------------------------
@register_model
def test_roadmap(**kw) -> RoadmapNet:
    """Step 8's switches (patchify stem, inverted BN/ReLU blocks with the 7×7 depthwise conv first, strided
    shortcut convs), 1 block per stage, widths 8..64: the registry-wide contract tests' view of the family."""
    return RoadmapNet(**{**step_kwargs(8), "depths": (1, 1, 1, 1), "width": 8, **kw})
