"""Model families. Importing this package registers every model."""
from . import convnext  # noqa: F401  (registers convnext*, convnextv2*)
from . import convnext_layouts  # noqa: F401  (registers ConvNeXt's checkpoint filter)
from . import replknet  # noqa: F401  (registers replknet_*, test_replknet)
from . import slak  # noqa: F401  (registers slak_*, test_slak)
from . import convmae  # noqa: F401  (registers convmae*)
from . import vit  # noqa: F401  (registers vit_*, test_vit)
from . import roadmap  # noqa: F401  (registers roadmap_* and the roadmap's checkpoint filter)
from ._helpers import (BackboneOnlyCheckpointError, CheckpointError, LoadReport, checkpoint_num_classes, load_checkpoint,
                       read_state_dict, save_weights)
from ._registry import checkpoint_filter_for, create_model, is_model, list_models, register_checkpoint_filter, register_model
from .convnext import ConvNeXt

__all__ = [
    "BackboneOnlyCheckpointError", "CheckpointError", "ConvNeXt", "LoadReport", "checkpoint_filter_for",
    "checkpoint_num_classes", "create_model",
    "is_model", "list_models", "load_checkpoint", "read_state_dict", "register_checkpoint_filter", "register_model",
    "save_weights",
]
