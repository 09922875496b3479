"""Reusable layers. Import from here: ``from maskconv.layers import LayerNorm2d, GlobalResponseNorm``."""
from .grn import GlobalResponseNorm, grn_nx
from .norm import LayerNorm, LayerNorm2d, layer_norm_fp32

__all__ = ["GlobalResponseNorm", "grn_nx", "LayerNorm", "LayerNorm2d", "layer_norm_fp32"]
