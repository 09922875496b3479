"""maskconv: modern ConvNets and masked-image pretraining in pure PyTorch.

Public API: ``create_model``, ``list_models``, ``load_checkpoint``, ``save_weights``, ``save_pretrained`` /
``from_pretrained`` (weight folders timm reads), ``register_with_timm`` (maskconv's models in timm's registry).
"""
from .models import (CheckpointError, create_model, from_pretrained, list_models, load_checkpoint, register_with_timm,
                     save_pretrained, save_weights)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "create_model", "from_pretrained", "list_models", "load_checkpoint", "register_with_timm",
           "save_pretrained", "save_weights", "__version__"]
