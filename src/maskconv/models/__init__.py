"""Model families. Importing this package registers every model."""
from . import convnext  # noqa: F401  (registers convnext*, convnextv2*)
from . import replknet  # noqa: F401  (registers replknet_*, test_replknet)
from . import slak  # noqa: F401  (registers slak_*, test_slak)
from . import convmae  # noqa: F401  (registers convmae*)
from . import vit  # noqa: F401  (registers vit_*, test_vit)
from ._helpers import CheckpointError, LoadReport, checkpoint_num_classes, load_checkpoint, read_state_dict, save_weights
from ._registry import create_model, is_model, list_models, register_model
from .convnext import ConvNeXt

__all__ = [
    "CheckpointError", "ConvNeXt", "LoadReport", "checkpoint_num_classes", "create_model", "is_model", "list_models",
    "load_checkpoint", "read_state_dict", "register_model", "save_weights", "stem_stride_kwarg",
]


def stem_stride_kwarg(name: str) -> str:
    """The constructor argument of model ``name`` that sets its stem stride: ``stem_stride`` for the ConvNeXt
    family (SLaK included; timm's ``patch_size`` means another network there at 2), ``patch_size`` for the
    others (ViT and ConvMAE patch embeddings, as in timm / the official code; RepLKNet: fixed at 4)."""
    import torch

    with torch.device("meta"):  # the class only: no weights allocated
        return "stem_stride" if isinstance(create_model(name), ConvNeXt) else "patch_size"
