"""maskconv: modern ConvNets and masked-image pretraining in pure PyTorch.

Public API: ``create_model``, ``list_models``, ``load_checkpoint``, ``save_weights``.
"""
from .models import CheckpointError, create_model, list_models, load_checkpoint, save_weights

__version__ = "0.1.0"
__all__ = ["CheckpointError", "create_model", "list_models", "load_checkpoint", "save_weights", "__version__"]
