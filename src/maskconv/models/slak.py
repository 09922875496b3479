"""SLaK: Sparse Large Kernel Network.

Paper: "More ConvNets in the 2020s: Scaling up Kernels Beyond 51×51 using Sparsity" (Liu et al., ICLR 2023,
arXiv:2207.03620). Origin: VITA-Group/SLaK ``models/SLaK.py`` (MIT-licensed code, built on ConvNeXt; check the
licence of any weights you load).

A ConvNeXt V1 (LN stem / downsampling / blocks, layer scale 1e-6, GELU MLP) 1.3× wider, whose blocks' depthwise
7×7 conv is SLaK's decomposed large kernel: M×N + N×M + N×N depthwise conv-BN branches (stage kernels M
(51, 49, 47, 13), short edge N=5; VITA-Group/SLaK, models/SLaK.py). It *is* our ``ConvNeXt`` with per-stage kernel sizes and a
``conv_dw`` factory, so it shares the model contract (forward_intermediates, feature_info, layer ids for
layer-wise lr decay, grad checkpointing) and timm's key layout: the official ``stages.i.j.large_kernel.LoRA1.*``
is ours ``stages.i.blocks.j.conv_dw.LoRA1.*``. ``maskconv.export.reparameterize_model`` merges every large
kernel into one M×M depthwise conv (``conv_dw.lkb_reparam``) for inference.

The dynamic sparse training SLaK is published with (40% sparsity, reported params count non-zeros only) is a
training-time mask on these dense weights; the parameter counts here are dense.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from ..layers import DecomposedLargeKernelConv
from ..layers.large_kernel import check_merge_state
from . import convnext_layouts
from ._registry import register_checkpoint_filter, register_model
from .convnext import ConvNeXt

__all__ = ["SLaK", "checkpoint_filter_fn"]


class SLaK(ConvNeXt):
    """ConvNeXt with SLaK's decomposed large-kernel depthwise conv in every block.

    ``dims`` are the ConvNeXt widths before ``width_factor`` (the official ``int(d * width_factor)``);
    ``kernel_size``: the large kernel M per stage; ``small_kernel``: N, the short edge and the small kernel.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        kernel_size: int | Sequence[int] = (51, 49, 47, 13),
        small_kernel: int = 5,
        width_factor: float = 1.3,
        ls_init_value: float | None = 1e-6,
        **kwargs,
    ):
        if width_factor <= 0:
            raise ValueError(f"width_factor={width_factor}: must be > 0")
        super().__init__(
            depths=depths, dims=tuple(int(d * width_factor) for d in dims), kernel_size=kernel_size,
            ls_init_value=ls_init_value, conv_dw=partial(DecomposedLargeKernelConv, small_kernel=small_kernel),
            **kwargs,
        )
        self.small_kernel = small_kernel  # the per-stage M are ConvNeXt's ``kernel_sizes``


# ---- checkpoint layouts -----------------------------------------------------------------------------------
@register_checkpoint_filter(SLaK)
def checkpoint_filter_fn(state_dict: dict, model: SLaK) -> tuple[dict, str]:
    """Map an official SLaK state dict (``downsample_layers.*``, ``stages.i.j.large_kernel.LoRA1.conv.weight``,
    ``pwconv1``, ``gamma``, ``norm``, ``head``; older commits name the branches ``Decom1``/``Decom2``) or ours to
    ours. Returns ``(state_dict, layout)`` with layout ``'slak'`` (official) or ``'timm'`` (maskconv/timm keys).
    Reshapes: ConvNeXt's per-layout ones only (the large-kernel convs and BNs are stored as ours)."""
    if not any(".large_kernel." in k or ".conv_dw." in k for k in state_dict):
        raise ValueError(
            "not a SLaK checkpoint: no large-kernel keys ('stages.0.0.large_kernel.LoRA1.conv.weight' official, "
            f"'stages.0.blocks.0.conv_dw.LoRA1.conv.weight' ours); first keys are {list(state_dict)[:5]}"
        )
    check_merge_state(state_dict, model)
    # ConvNeXt's filter does the stem / downsample / block / MLP / head renames of the official FB layout
    sd, layout = convnext_layouts.checkpoint_filter_fn(state_dict, model)
    out = {}
    for k, v in sd.items():
        k = k.replace(".large_kernel.", ".conv_dw.").replace(".Decom1.", ".LoRA1.").replace(".Decom2.", ".LoRA2.")
        out[k] = v
    return out, "slak" if layout == "fb" else layout


# ---- configs and registered variants (VITA-Group/SLaK models/SLaK.py) ----------------------------------------------
_SIZES = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


def _create(size: str, **kwargs) -> SLaK:
    depths, dims = _SIZES[size]
    return SLaK(depths=depths, dims=dims, **kwargs)


@register_model
def slak_tiny(**kw) -> SLaK:
    """SLaK-T: dims [124, 249, 499, 998], depths [3, 3, 9, 3], kernels 51/49/47/13, N=5 (50.7M dense params)."""
    return _create("tiny", **kw)


@register_model
def slak_small(**kw) -> SLaK:
    """SLaK-S: SLaK-T widths, depths [3, 3, 27, 3] (91.1M dense params)."""
    return _create("small", **kw)


@register_model
def slak_base(**kw) -> SLaK:
    """SLaK-B: dims [166, 332, 665, 1331], depths [3, 3, 27, 3] (158.0M dense params)."""
    return _create("base", **kw)


# ---- tiny variant for fast tests (not a published architecture) --------------------------------------------
@register_model
def test_slak(**kw) -> SLaK:
    """4 stages, 1 block each, widths 8..64, kernels 11/9/7/5 with N=3 (stage 4: M > N still has 3 branches)."""
    return SLaK(**{**dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=(11, 9, 7, 5), small_kernel=3,
                          width_factor=1.0), **kw})
