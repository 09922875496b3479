"""Reusable layers. Import from here: ``from maskconv.layers import LayerNorm2d, GlobalResponseNorm``."""
from .grn import GlobalResponseNorm, grn_nx
from .large_kernel import ConvBN, DecomposedLargeKernelConv, ReparamLargeKernelConv, pad_kernel_to
from .mlp import GELU, Mlp, pointwise
from .norm import LayerNorm, LayerNorm2d, layer_norm_fp32
from .pos_embed import resample_pos_embed, sincos_pos_embed_1d, sincos_pos_embed_2d
from .transformer import Attention, Block, LayerScale
from .weight_init import init_mae, init_trunc_normal

__all__ = ["ConvBN", "DecomposedLargeKernelConv", "ReparamLargeKernelConv", "pad_kernel_to",
           "GlobalResponseNorm", "grn_nx", "GELU", "Mlp", "pointwise", "LayerNorm", "LayerNorm2d", "layer_norm_fp32",
           "resample_pos_embed", "sincos_pos_embed_1d", "sincos_pos_embed_2d", "Attention", "Block", "LayerScale",
           "init_mae", "init_trunc_normal"]
