"""RepLKNet.

Paper: "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs" (Ding et al., CVPR 2022,
arXiv:2203.06717). Origin: DingXiaoH/RepLKNet-pytorch ``replknet.py`` (MIT-licensed code; check the licence of
any weights you load).

BatchNorm everywhere (DingXiaoH/RepLKNet-pytorch, replknet.py): stem conv3×3/2 → DW3×3 → 1×1 → DW3×3/2 (each
conv-BN-ReLU); per stage, pairs of RepLKBlock (BN → 1×1 conv-BN-ReLU → DW M×M conv-BN + DW 5×5 conv-BN → ReLU →
1×1 conv-BN, residual) and ConvFFN (BN → 1×1 conv-BN to 4C → GELU → 1×1 conv-BN, residual); transitions 1×1 conv-BN-ReLU → DW3×3/2
conv-BN-ReLU; head BN → average pool → Linear. Keys are the official ones (``stem.i``, ``stages.i.blocks.k``
with RepLK blocks at even k and ConvFFNs at odd k, ``transitions.i``) except the head, which takes timm's
``head.norm`` / ``head.fc`` names (the official ``norm`` / ``head``; ``checkpoint_filter_fn`` maps them).
Weights keep PyTorch's default init, as the official code. ``maskconv.export.reparameterize_model`` merges each
large kernel into one M×M depthwise conv (``large_kernel.lkb_reparam``) for inference.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from ..layers import ConvBN, ReparamLargeKernelConv
from ..layers.large_kernel import check_merge_state
from ._registry import register_checkpoint_filter, register_model
from ._features import feature_indices

__all__ = ["RepLKNet", "RepLKBlock", "ConvFFN", "checkpoint_filter_fn"]


def _drop_path(rate: float) -> nn.Module:
    return StochasticDepth(rate, "row") if rate > 0 else nn.Identity()


class RepLKBlock(nn.Module):
    """BN -> 1×1 conv-BN-ReLU -> large-kernel DW conv-BN (+ small DW conv-BN) -> ReLU -> 1×1 conv-BN, residual."""

    def __init__(self, dim: int, dw_dim: int, kernel_size: int, small_kernel: int | None, drop_path: float = 0.0):
        super().__init__()
        self.pw1 = ConvBN(dim, dw_dim, 1, act=True)
        self.pw2 = ConvBN(dw_dim, dim, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_dim, kernel_size, small_kernel)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        out = self.pw1(self.prelkb_bn(x))  # (B, C_dw, H, W)
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))  # (B, C, H, W)
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """BN -> 1×1 conv-BN (C -> hidden) -> GELU -> 1×1 conv-BN (hidden -> C), residual."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(dim)
        self.pw1 = ConvBN(dim, hidden, 1)
        self.pw2 = ConvBN(hidden, dim, 1)
        self.nonlinear = nn.GELU()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """``depth`` × (RepLKBlock, ConvFFN) in one ``blocks`` list (official indices: RepLK even, FFN odd)."""

    def __init__(self, dim: int, depth: int, kernel_size: int, small_kernel: int | None, dp_rates: Sequence[float],
                 dw_ratio: float = 1.0, ffn_ratio: float = 4.0):
        super().__init__()
        blocks = []
        for j in range(depth):  # a RepLK block and its FFN share one drop-path rate, as the official code
            blocks.append(RepLKBlock(dim, int(dim * dw_ratio), kernel_size, small_kernel, dp_rates[j]))
            blocks.append(ConvFFN(dim, int(dim * ffn_ratio), dp_rates[j]))
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x


class ClassifierHead(nn.Module):
    """BatchNorm on the map -> global average pool -> dropout -> Linear (official ``norm`` / ``head``)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, C, H, W)
        x = self.norm(x).mean((2, 3))  # (B, C)
        if pre_logits:
            return x
        return self.fc(self.drop(x))  # (B, num_classes)


class RepLKNet(nn.Module):
    """RepLKNet with the timm model contract (as ``ConvNeXt``)."""

    first_conv = "stem.0.conv"  # adapted when loading weights made for another ``in_chans``

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        dims: tuple[int, ...] = (128, 256, 512, 1024),
        kernel_size: Sequence[int] = (31, 29, 27, 13),
        small_kernel: int | None = 5,
        dw_ratio: float = 1.0,
        ffn_ratio: float = 4.0,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        patch_size: int = 4,
    ):
        """``head_init_scale`` scales the classifier's init (ConvNeXt's fine-tuning option; 1.0 = official);
        ``patch_size`` is accepted for the common model options, but the stem's stride is fixed at 4."""
        super().__init__()
        if patch_size != 4:
            raise ValueError(f"patch_size={patch_size}: RepLKNet's stem (two stride-2 convs) has a fixed stride of 4")
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; RepLKNet uses 'avg'")
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * len(depths)
        if not len(depths) == len(dims) == len(kernel_size):
            raise ValueError(f"depths {depths}, dims {dims} and kernel_size {kernel_size} need one entry per stage")
        if in_chans < 1:
            raise ValueError(f"in_chans ({in_chans}) must be >= 1")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.depths, self.dims, self.kernel_sizes = tuple(depths), tuple(dims), tuple(kernel_size)
        self.stride = 4 * 2 ** (len(depths) - 1)
        d0 = dims[0]
        self.stem = nn.Sequential(
            ConvBN(in_chans, d0, 3, stride=2, padding=1, act=True),
            ConvBN(d0, d0, 3, padding=1, groups=d0, act=True),
            ConvBN(d0, d0, 1, act=True),
            ConvBN(d0, d0, 3, stride=2, padding=1, groups=d0, act=True),
        )
        dp = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: works under a meta device
        stages, transitions, cursor = [], [], 0
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(RepLKNetStage(dim, depth, kernel_size[i], small_kernel, dp[cursor: cursor + depth],
                                        dw_ratio=dw_ratio, ffn_ratio=ffn_ratio))
            if i < len(depths) - 1:
                transitions.append(nn.Sequential(
                    ConvBN(dim, dims[i + 1], 1, act=True),
                    ConvBN(dims[i + 1], dims[i + 1], 3, stride=2, padding=1, groups=dims[i + 1], act=True),
                ))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            cursor += depth
        self.stages = nn.ModuleList(stages)
        self.transitions = nn.ModuleList(transitions)
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        if head_init_scale != 1.0 and isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    # ---- timm model contract -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channels but the model was built with in_chans={self.in_chans} "
                f"(create_model(..., in_chans={x.shape[1]}) adapts pretrained weights)"
            )

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # channels_last: oneDNN's depthwise and 1×1 convs are much faster on CPU in this layout
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_chans, H, W) -> (B, C, H/32, W/32)
        x = self._stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

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
        """Stage outputs (before the next transition; timm's signature). ``indices``: last n stages (int) or
        stage indices (list). Returns ``(final_features, [stage maps])``, or only the list with
        ``intermediates_only``. ``norm`` is accepted for timm compatibility (no per-stage norm here)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take = feature_indices(indices, len(self.stages))
        out = []
        x = self._stem(x)
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in take:
                out.append(x)
            if i < last:
                x = self.transitions[i](x)
        return out if intermediates_only else (x, out)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; RepLKNet uses 'avg'")
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards separately (their parameters are gathered just for their own forward)."""
        return list(self.stages)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the default rule (1-D tensors and biases, i.e. BN and biases), as the official code."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^(?:stages|transitions)\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^transitions\.(\d+)", (99999,)),
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
        """Layer id of a parameter. ``group``: the official ``get_num_layer_for_replknet`` (12 groups of two
        RepLK + two FFN blocks; stem 0, head 13). ``single``: stem 0, one id per (RepLK, FFN) pair, a transition
        shares the id of the next stage's first pair (as ConvNeXt's downsample layers), head on top."""
        top = self.num_lr_layers(scheme)
        m_bl = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
        m_tr = re.match(r"transitions\.(\d+)\.", name)
        if scheme == "group" and len(self.depths) != 4:
            raise ValueError("the 'group' layer-decay scheme is defined for 4-stage RepLKNets only")
        if name.startswith("stem."):
            return 0
        if m_bl:
            stage, block = int(m_bl.group(1)), int(m_bl.group(2))
            if scheme == "single":
                return sum(self.depths[:stage]) + block // 2 + 1
            return stage + 1 if stage < 2 else (3 + block // 4 if stage == 2 else 12)
        if m_tr:
            t = int(m_tr.group(1))
            if scheme == "single":
                return sum(self.depths[: t + 1]) + 1
            return t + 1 if t < 2 else 11
        return top


# ---- checkpoint layouts -----------------------------------------------------------------------------------
@register_checkpoint_filter(RepLKNet)
def checkpoint_filter_fn(state_dict: dict, model: RepLKNet) -> tuple[dict, str]:
    """Map an official RepLKNet state dict (head ``norm.*`` / ``head.*``) or ours (``head.norm`` / ``head.fc``) to
    ours. Returns ``(state_dict, layout)``: ``'replknet'`` (official) or ``'maskconv'``. No reshapes: the official
    modules store every tensor as ours."""
    if not any(k.startswith("stem.0.conv.") for k in state_dict):
        raise ValueError(f"not a RepLKNet checkpoint: no 'stem.0.conv.weight'; first keys are {list(state_dict)[:5]}")
    check_merge_state(state_dict, model)
    official = any(k.startswith("norm.") or k in ("head.weight", "head.bias") for k in state_dict)
    if not official:
        return dict(state_dict), "maskconv"
    out = {}
    for k, v in state_dict.items():
        if k.startswith("norm."):
            k = "head." + k
        elif k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out, "replknet"


# ---- configs and registered variants (RepLKNet-pytorch replknet.py) ------------------------------------------------
@register_model
def replknet_31b(**kw) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13 + 5×5, depths [2, 2, 18, 2], dims [128, 256, 512, 1024] (79M params)."""
    return RepLKNet(**{**dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), kernel_size=(31, 29, 27, 13),
                              small_kernel=5), **kw})


@register_model
def replknet_31l(**kw) -> RepLKNet:
    """RepLKNet-31L: as 31B with dims [192, 384, 768, 1536] (172M params)."""
    return RepLKNet(**{**dict(depths=(2, 2, 18, 2), dims=(192, 384, 768, 1536), kernel_size=(31, 29, 27, 13),
                              small_kernel=5), **kw})


@register_model
def replknet_xl(**kw) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13 without a small kernel, dims [256, 512, 1024, 2048], dw_ratio 1.5 (335M)."""
    return RepLKNet(**{**dict(depths=(2, 2, 18, 2), dims=(256, 512, 1024, 2048), kernel_size=(27, 27, 27, 13),
                              small_kernel=None, dw_ratio=1.5), **kw})


# ---- tiny variant for fast tests (not a published architecture) --------------------------------------------
@register_model
def test_replknet(**kw) -> RepLKNet:
    """4 stages, 1 (RepLK, FFN) pair each, widths 8..64, kernels 11/9/7/5 with a 3×3 small kernel."""
    return RepLKNet(**{**dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=(11, 9, 7, 5),
                              small_kernel=3), **kw})
