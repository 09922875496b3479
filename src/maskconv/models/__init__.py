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
from ._timm import register_with_timm
from .convnext import ConvNeXt
from .hub import from_pretrained, save_pretrained

__all__ = [
    "BackboneOnlyCheckpointError", "CheckpointError", "ConvNeXt", "LoadReport", "checkpoint_filter_for",
    "checkpoint_num_classes", "create_model", "from_pretrained",
    "is_model", "list_models", "load_checkpoint", "read_state_dict", "register_checkpoint_filter", "register_model",
    "register_with_timm", "save_pretrained", "save_weights", "stem_stride_kwarg", "architecture_kwargs",
]


def stem_stride_kwarg(name: str) -> str:
    """The constructor argument of model ``name`` that sets its stem stride: ``stem_stride`` for the ConvNeXt
    family (SLaK included; timm's ``patch_size`` means another network there at 2), ``patch_size`` for the
    others (ViT and ConvMAE patch embeddings, as in timm / the official code; RepLKNet: fixed at 4)."""
    import torch

    with torch.device("meta"):  # the class only: no weights allocated
        return "stem_stride" if isinstance(create_model(name), ConvNeXt) else "patch_size"


def architecture_kwargs(name: str, stem_stride: int | None = None, width_mult: float = 1.0) -> dict:
    """The constructor arguments a run's ``model.stem_stride`` / ``model.width_mult`` give model ``name`` (the one
    place every task turns them into keywords); a family without a width multiplier refuses one in a line."""
    import torch

    kw = {} if stem_stride is None else {stem_stride_kwarg(name): stem_stride}
    if width_mult != 1.0:
        try:
            with torch.device("meta"):
                create_model(name, width_mult=width_mult)
        except TypeError:
            raise ValueError(f"model.width_mult={width_mult}: {name} has no width multiplier (the roadmap_* models "
                             "have one)") from None
        kw["width_mult"] = width_mult
    return kw
