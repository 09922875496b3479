"""ConvNeXt V1 and V2.

Papers: "A ConvNet for the 2020s" (Liu et al., 2022, arXiv:2201.03545) and "ConvNeXt V2: Co-designing and
Scaling ConvNets with Masked Autoencoders" (Woo et al., 2023, arXiv:2301.00808).
Origin: facebookresearch/ConvNeXt and facebookresearch/ConvNeXt-V2 (MIT-licensed code; official weights are
CC-BY-NC-4.0). Parameter names and shapes follow timm's ``convnext.py`` so a state dict is interchangeable with
timm's same-named model; ``convnext_layouts.checkpoint_filter_fn`` also reads the official FB (incl.
MinkowskiEngine FCMAE) and HF transformers layouts.

Activations are kept in ``torch.channels_last`` memory, so the NCHW <-> NHWC permutes around the per-pixel
LayerNorm/MLP are free views instead of copies. Atto..nano store their MLP weights as 1x1 convs (timm's
``conv_mlp`` layout) and run them as 1x1 convolutions on the channels-last map.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from ..layers import LayerNorm, LayerNorm2d, Mlp, init_trunc_normal
from ._features import check_image_input, feature_indices
from ._registry import register_model

__all__ = ["ConvNeXt", "ConvNeXtBlock"]


class ConvNeXtBlock(nn.Module):
    """dwconv k×k -> LN -> Linear 4C -> GELU -> [GRN] -> Linear C -> [layer scale] -> drop path + residual.

    Three named sub-steps, the only places the block's ops are written: ``spatial`` (the depthwise conv, the one
    op that mixes positions), ``channel`` (LN -> MLP -> layer scale, per position over the last dim) and
    ``residual``. ``forward`` and FCMAE's masked paths (``pretrain/fcmae.py``: dense, and gathered on visible
    tokens) are compositions of them, so they cannot drift apart, and the no-grad fast path (in-place GELU in
    ``mlp.act``, GRN and residual into fresh buffers) lives inside them: every mode runs the same modules.

    Feature hook points (``ConvNeXt.feature_modules``): the block itself (output (B, C, H, W), the residual
    stream; its forward only) and ``mlp.act`` (output (..., 4C), after GELU, before GRN; every path).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        use_grn: bool = False,
        conv_mlp: bool = False,
        drop_path: float = 0.0,
        conv_dw: Callable[[int, int], nn.Module] | None = None,
    ):
        super().__init__()
        # conv_dw(dim, kernel_size): another depthwise spatial mixer (SLaK's decomposed large kernel)
        if conv_dw is not None:
            self.conv_dw = conv_dw(dim, kernel_size)
        else:
            self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim)
        # conv_mlp (atto..nano): 1x1-conv weights and square-and-sum GRN statistics, the fast form at their wide,
        # small-C maps
        self.mlp = Mlp(dim, int(mlp_ratio * dim), use_grn=use_grn, use_conv=conv_mlp, grn_sumsq_stats=conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value else None
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def spatial(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.conv_dw(x)

    def channel(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) channels-last -> (..., C): LN -> MLP -> layer scale. GRN pools over dims 1, 2, so give it
        (B, H, W, C) or a per-sample (B, L, 1, C) view; ``masked`` (B, H, W, 1) bool zeroes cells before GRN."""
        x = self.mlp(self.norm(x), masked)
        if self.gamma is not None:
            x = x * self.gamma
        return x

    def residual(self, shortcut: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """shortcut + drop_path(y), per sample over dim 0. ``y`` is the caller's fresh branch output, which no
        backward needs: the shortcut is added into it (same bits as shortcut + y, one buffer fewer; autograd's
        version check would flag it if that ever changed)."""
        return self.drop_path(y).add_(shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.channel(self.spatial(x).permute(0, 2, 3, 1))  # (B, H, W, C): a view for channels_last memory
        return self.residual(x, y.permute(0, 3, 1, 2))  # (B, C, H, W)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, dp_rates, **block_kw):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, drop_path=dp_rates[j], **block_kw) for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> dropout -> Linear (timm's ``head.norm`` / ``head.fc`` keys)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = LayerNorm(in_features)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, C, H, W)
        x = self.norm(x.mean((2, 3)))  # (B, C)
        if pre_logits:
            return x
        return self.fc(self.drop(x))  # (B, num_classes)


def resolve_stem_stride(patch_size: int | None, stem_stride: int | None) -> int:
    """The stem stride from timm's ``patch_size`` and/or maskconv's ``stem_stride`` (default 4); see ``ConvNeXt``.

    timm's ``patch_size`` is refused where timm builds another network from it (timm/models/convnext.py,
    ``ConvNeXt.__init__``): at 2 timm adds a stride-2 downsample to stage 0, and from 8 on its stride cap
    (``output_stride`` <= 32) turns the last downsample into a dilation. ``stem_stride`` builds them all."""
    if patch_size is not None and (patch_size == 2 or patch_size >= 8):
        why = ("adds a stride-2 downsample to stage 0 (total stride 32)" if patch_size == 2 else
               "caps the total stride at 32 and dilates the last stage instead")
        raise ValueError(f"patch_size={patch_size}: timm's ConvNeXt then {why}, which maskconv does not build; for "
                         f"a plain stride-{patch_size} stem (total stride {patch_size * 8}) use stem_stride={patch_size} "
                         "(weights without a timm equivalent)")
    if patch_size is not None and stem_stride is not None and patch_size != stem_stride:
        raise ValueError(f"patch_size={patch_size} and stem_stride={stem_stride} disagree: give one")
    stride = stem_stride if stem_stride is not None else patch_size if patch_size is not None else 4
    if stride < 1:
        raise ValueError(f"stem_stride ({stride}) must be >= 1")
    return stride


class ConvNeXt(nn.Module):
    """ConvNeXt V1 (``ls_init_value``, no GRN) and V2 (``use_grn=True``, ``ls_init_value=None``)."""

    first_conv = "stem.0"  # adapted when loading weights made for another ``in_chans``

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        kernel_size: int | Sequence[int] = 7,
        ls_init_value: float | None = 1e-6,
        use_grn: bool = False,
        conv_mlp: bool = False,
        patch_size: int | None = None,
        stem_stride: int | None = None,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        conv_dw: Callable[[int, int], nn.Module] | None = None,
    ):
        """``kernel_size``: one size or one per stage; ``conv_dw(dim, kernel_size)``: the blocks' depthwise module
        (default: a k×k depthwise ``nn.Conv2d`` with bias), e.g. SLaK's decomposed large kernel.

        ``stem_stride`` (default 4): kernel = stride of the patchify stem; the stages then downsample 2× each
        (total stride ``stem_stride * 8``). ``patch_size`` is timm's argument, accepted where timm builds the same
        network from it (1 and 3-7; see ``resolve_stem_stride``): such weights load strict into timm's model
        built with ``patch_size=stem_stride`` and give the same outputs."""
        super().__init__()
        stem_stride = resolve_stem_stride(patch_size, stem_stride)
        kernel_sizes = (kernel_size,) * len(depths) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel_sizes) != len(depths):
            raise ValueError(f"kernel_size {kernel_size}: give one size or one per stage ({len(depths)} stages)")
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; ConvNeXt uses 'avg'")
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have the same length")
        if in_chans < 1:
            raise ValueError(f"in_chans ({in_chans}) must be >= 1")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.depths, self.dims, self.kernel_sizes = tuple(depths), tuple(dims), kernel_sizes
        self.drop_rate = drop_rate
        self.stem_stride = stem_stride
        self.stride = stem_stride * 2 ** (len(depths) - 1)  # total stride: the patch size of FCMAE
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride), LayerNorm2d(dims[0]))

        dp = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: works under a meta device
        stages, prev, cursor = [], dims[0], 0
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(
                ConvNeXtStage(
                    prev, dim, depth, downsample=i > 0, dp_rates=dp[cursor : cursor + depth],
                    kernel_size=kernel_sizes[i], ls_init_value=ls_init_value, use_grn=use_grn, conv_mlp=conv_mlp,
                    conv_dw=conv_dw,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=stem_stride * 2**i, module=f"stages.{i}"))
            prev, cursor = dim, cursor + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.apply(init_trunc_normal)
        if head_init_scale != 1.0 and isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    # ---- timm model contract -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor the strides allow."""
        check_image_input(x, self.in_chans, self.stride, "the model's total stride")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # channels_last once here: every later permute to NHWC is then a view (see module docstring).
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_chans, H, W) -> (B, C, H/s, W/s)
        return self.stages(self._stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (timm's signature). ``indices``: last n stages (int) or stage indices (list).

        Returns ``(final_features, [stage maps])``, or only the list with ``intermediates_only``.
        ``norm`` is accepted for timm compatibility: ConvNeXt has no pre-head norm on feature maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take = feature_indices(indices, len(self.stages))
        out = []
        x = self._stem(x)
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                out.append(x)
        return out if intermediates_only else (x, out)

    FEATURE_POINTS = ("block", "mlp")

    def feature_modules(self, where: str = "block") -> list[tuple[str, nn.Module]]:
        """``[(block name, module)]`` for every block, in depth order: the documented hook point of feature
        ``where``, a module whose forward runs with and without autograd, so a forward hook on it sees every
        call. ``'block'``: the block, output (B, C, H, W) (the residual stream), in the model's own forward
        (FCMAE's masked paths call its sub-steps instead); ``'mlp'``: its MLP's activation ``mlp.act``, output
        (..., 4C) after GELU, before GRN, in every path incl. FCMAE's (channels-last; written in place without
        autograd, so read the output, not the input)."""
        if where not in self.FEATURE_POINTS:
            raise ValueError(f"where={where!r}: use one of {', '.join(map(repr, self.FEATURE_POINTS))}")
        return [(f"stages.{i}.blocks.{j}", blk if where == "block" else blk.mlp.act)
                for i, st in enumerate(self.stages) for j, blk in enumerate(st.blocks)]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; ConvNeXt uses 'avg'")
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_trunc_normal(self.head.fc)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards separately (their parameters are gathered just for their own forward)."""
        return list(self.stages)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """GRN gamma/beta and layer scales: the official fine-tuning recipe never decays them."""
        return {n for n, _ in self.named_parameters() if ".grn." in n or n.endswith(".gamma")}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    def num_lr_layers(self, scheme: str = "single") -> int:
        """Largest layer id for layer-wise lr decay; a parameter's lr scale is ``decay ** (max - id)``."""
        if scheme == "single":
            return sum(self.depths) + 1
        if scheme == "group":
            return 13
        raise ValueError(f"unknown layer-decay scheme {scheme!r}: use 'single' or 'group'")

    def layer_id(self, name: str, scheme: str = "single") -> int:
        """Layer id of a parameter, as the official ConvNeXt(-V2) ``optim_factory`` (``single``/``group``).

        Our ``stem`` is their ``downsample_layers.0``, ``stages.i.downsample`` their ``downsample_layers.i``,
        ``stages.i.blocks.j`` their ``stages.i.j``; anything else (head) gets the top id.
        """
        top = self.num_lr_layers(scheme)
        m_ds = re.match(r"stages\.(\d+)\.downsample\.", name)
        m_bl = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
        if name.startswith("stem."):
            stage, block, is_ds = 0, None, True
        elif m_ds:
            stage, block, is_ds = int(m_ds.group(1)), None, True
        elif m_bl:
            stage, block, is_ds = int(m_bl.group(1)), int(m_bl.group(2)), False
        else:
            return top
        if scheme == "single":
            base = sum(self.depths[:stage])
            return base + 1 if is_ds else base + block + 1
        if len(self.depths) != 4:
            raise ValueError("the 'group' layer-decay scheme is defined for 4-stage ConvNeXts only")
        if is_ds:
            return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
        if stage < 2:
            return stage + 1
        return 3 + block // 3 if stage == 2 else 12


# ---- configs and registered variants (shapes from ConvNeXt models/convnext.py, V2 models/convnextv2.py, timm) ------
_V1 = dict(ls_init_value=1e-6)
_V2 = dict(use_grn=True, ls_init_value=None)
_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), False),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), False),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816), False),
}


def _create(size: str, version: dict, **kwargs) -> ConvNeXt:
    depths, dims, conv_mlp = _SIZES[size]
    return ConvNeXt(depths=depths, dims=dims, conv_mlp=conv_mlp, **{**version, **kwargs})


@register_model
def convnext_atto(**kw) -> ConvNeXt:
    return _create("atto", _V1, **kw)


@register_model
def convnext_femto(**kw) -> ConvNeXt:
    return _create("femto", _V1, **kw)


@register_model
def convnext_pico(**kw) -> ConvNeXt:
    return _create("pico", _V1, **kw)


@register_model
def convnext_nano(**kw) -> ConvNeXt:
    return _create("nano", _V1, **kw)


@register_model
def convnext_tiny(**kw) -> ConvNeXt:
    return _create("tiny", _V1, **kw)


@register_model
def convnext_small(**kw) -> ConvNeXt:
    return _create("small", _V1, **kw)


@register_model
def convnext_base(**kw) -> ConvNeXt:
    return _create("base", _V1, **kw)


@register_model
def convnext_large(**kw) -> ConvNeXt:
    return _create("large", _V1, **kw)


@register_model
def convnext_xlarge(**kw) -> ConvNeXt:
    return _create("xlarge", _V1, **kw)


@register_model
def convnextv2_atto(**kw) -> ConvNeXt:
    return _create("atto", _V2, **kw)


@register_model
def convnextv2_femto(**kw) -> ConvNeXt:
    return _create("femto", _V2, **kw)


@register_model
def convnextv2_pico(**kw) -> ConvNeXt:
    return _create("pico", _V2, **kw)


@register_model
def convnextv2_nano(**kw) -> ConvNeXt:
    return _create("nano", _V2, **kw)


@register_model
def convnextv2_tiny(**kw) -> ConvNeXt:
    return _create("tiny", _V2, **kw)


@register_model
def convnextv2_small(**kw) -> ConvNeXt:
    """timm-only size (no official weights)."""
    return _create("small", _V2, **kw)


@register_model
def convnextv2_base(**kw) -> ConvNeXt:
    return _create("base", _V2, **kw)


@register_model
def convnextv2_large(**kw) -> ConvNeXt:
    return _create("large", _V2, **kw)


@register_model
def convnextv2_huge(**kw) -> ConvNeXt:
    return _create("huge", _V2, **kw)


# ---- tiny variants for fast tests (not published architectures) -------------------------------------------
@register_model
def test_convnext(**kw) -> ConvNeXt:
    """4 stages, 1 block each, widths 8..64; V1 blocks."""
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **{**_V1, **kw})


@register_model
def test_convnextv2(**kw) -> ConvNeXt:
    """4 stages, depths 1/1/2/1, widths 8..64; V2 blocks with 1x1-conv MLP weights (timm's conv_mlp layout)."""
    return ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), conv_mlp=True, **{**_V2, **kw})

