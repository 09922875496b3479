"""Save / load a whole pretraining objective (encoder + decoder + its config) as one safetensors file, so
pretraining can be continued on new data and reconstructions drawn from the file alone."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ..models import CheckpointError, save_weights


def save_objective(obj: nn.Module, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
    cfg = getattr(obj.encoder, "pretrained_cfg", {})
    if "architecture" not in cfg:
        raise ValueError("the encoder was not built with maskconv.create_model: its architecture is unknown")
    meta = {"maskconv_objective": type(obj).__name__.lower(), "objective_config": json.dumps(obj.config),
            "architecture": cfg["architecture"], "model_kwargs": json.dumps(cfg.get("model_kwargs", {}))}
    return save_weights(state_dict if state_dict is not None else obj.state_dict(), path, metadata=meta)


def load_objective(path: str | os.PathLike, **overrides) -> nn.Module:
    """Rebuild the objective saved by ``save_objective`` and load its weights strictly.
    ``overrides`` replace saved config values (e.g. ``mask_ratio=0.75``, ``sparse='dense'``)."""
    from safetensors import safe_open

    from . import create_objective

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a safetensors file written by save_objective ({e})") from None
    if "maskconv_objective" not in meta:
        raise CheckpointError(f"{path} holds no pretraining objective (no 'maskconv_objective' metadata); "
                              "weights-only files load with maskconv.load_checkpoint")
    model_kwargs = json.loads(meta.get("model_kwargs", "{}"))
    model_kwargs.pop("num_classes", None)
    from ..models import stem_stride_kwarg

    if "patch_size" in model_kwargs and stem_stride_kwarg(meta["architecture"]) == "stem_stride":
        model_kwargs["stem_stride"] = model_kwargs.pop("patch_size")  # a file from before the rename: same network
    obj = create_objective(meta["maskconv_objective"], model=meta["architecture"], model_kwargs=model_kwargs,
                           **{**json.loads(meta["objective_config"]), **overrides})
    from ..models import load_checkpoint

    load_checkpoint(obj, path, strict=True)
    return obj
