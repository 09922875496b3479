"""Model registry: ``register_model``, ``create_model``, ``list_models`` (timm's names and behaviour), and each model
class's checkpoint filter (``register_checkpoint_filter``; timm's ``pretrained_filter_fn``)."""
from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Callable

import torch.nn as nn

# name -> constructor. Filled at import time by @register_model in each family file (the only registry state).
_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}
# model class -> fn(state_dict, model) -> (state_dict, layout) that maps other checkpoint layouts to the class's keys.
# Filled at import time by @register_checkpoint_filter next to each filter (registry state, like _MODEL_FNS).
_FILTERS: dict[type, Callable[[dict, nn.Module], tuple[dict, str]]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    name = fn.__name__
    if name in _MODEL_FNS:
        raise ValueError(f"model {name!r} registered twice")
    _MODEL_FNS[name] = fn
    return fn


def register_checkpoint_filter(*classes: type) -> Callable:
    """Decorator: record ``fn(state_dict, model) -> (state_dict, layout)`` as the checkpoint filter of ``classes``
    (what timm passes as ``pretrained_filter_fn`` when it builds a model); ``load_checkpoint`` applies it."""
    def deco(fn: Callable) -> Callable:
        for cls in classes:
            if cls in _FILTERS:
                raise ValueError(f"a checkpoint filter for {cls.__name__} is registered twice")
            _FILTERS[cls] = fn
        return fn
    return deco


def checkpoint_filter_for(model: nn.Module) -> Callable[[dict, nn.Module], tuple[dict, str]] | None:
    """The checkpoint filter registered for ``model``'s class or its nearest registered base class (a subclass
    that renames nothing reads what its base reads); None: the model reads its own keys only."""
    return next((_FILTERS[c] for c in type(model).__mro__ if c in _FILTERS), None)


def list_models(pattern: str = "*", exclude_test: bool = False) -> list[str]:
    """Sorted registered names matching a shell pattern (``'convnextv2_*'``)."""
    names = sorted(n for n in _MODEL_FNS if fnmatch.fnmatch(n, pattern))
    if exclude_test:
        names = [n for n in names if not n.startswith("test_")]
    return names


def is_model(name: str) -> bool:
    return name.split(".", 1)[0] in _MODEL_FNS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    arch = name.split(".", 1)[0]  # timm-style 'arch.tag': the tag names pretrained weights only
    if arch not in _MODEL_FNS:
        close = difflib.get_close_matches(arch, list(_MODEL_FNS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See maskconv.list_models() or `maskconv models`.")
    return _MODEL_FNS[arch]


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_path_rate: float | None = None,
    allow_nonfinite: bool = False,
    allow_non_float: bool = False,
    cache_dir: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices=None,
    out_norm: bool = False,
    pyramid: bool | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model; ``pretrained`` is a checkpoint path (any layout ``load_checkpoint`` reads) or a
    weights folder as ``local-dir:DIR`` / ``hf-hub:org/name`` (``models/hub.py``).

    ``name`` may be such a folder too (timm's sources): its ``config.json`` names the model and its arguments, and
    ``pretrained=True`` loads its weights; ``hf-hub:`` reads the Hugging Face cache (``cache_dir``) only.

    ``num_classes=0`` gives the encoder only (``forward`` returns pooled, normed features). When the
    checkpoint's classifier has another class count it is dropped and the new head keeps its init.
    ``allow_nonfinite`` / ``allow_non_float``: ``load_checkpoint``'s opt-outs (NaN/Inf weights, integer or bool
    tensors into float parameters), for the rare checkpoint that needs them.

    ``features_only=True`` (timm's convention) returns the dense face ``models.dense.FeatureNet``: a list of
    per-stage maps with ``feature_info``; ``out_indices`` picks the stages, ``out_norm`` adds a LayerNorm per
    output, ``pyramid`` (ViT) ViTDet's simple feature pyramid (default on for a ViT). ``pretrained`` loads
    into the backbone before it is wrapped (strict, as for the classifier); it is built without a classifier
    (``num_classes=0``) unless ``num_classes`` says otherwise.
    """
    if features_only:
        model = create_model(name, pretrained, num_classes=0 if num_classes is None else num_classes, in_chans=in_chans,
                             drop_path_rate=drop_path_rate,
                             allow_nonfinite=allow_nonfinite, allow_non_float=allow_non_float, cache_dir=cache_dir,
                             **kwargs)
        from .dense import FeatureNet

        return FeatureNet(model, out_indices, out_norm=out_norm, pyramid=pyramid)
    if out_indices is not None or out_norm or pyramid is not None:
        raise ValueError("out_indices, out_norm and pyramid shape the dense face: pass features_only=True")
    from .hub import create_model_from_source, parse_source, resolve_folder, weights_file

    if parse_source(name)[0] is not None:
        return create_model_from_source(name, pretrained, cache_dir, num_classes=num_classes, in_chans=in_chans,
                                        drop_path_rate=drop_path_rate, allow_nonfinite=allow_nonfinite,
                                        allow_non_float=allow_non_float, **kwargs)
    if isinstance(pretrained, str) and parse_source(pretrained)[0] is not None:
        pretrained = str(weights_file(resolve_folder(*parse_source(pretrained), cache_dir)))
    fn = model_entrypoint(name)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("drop_path_rate", drop_path_rate)):
        if value is not None:
            kwargs[key] = value
    if pretrained is True:
        raise ValueError(
            "maskconv never downloads weights: pass pretrained=<path to a checkpoint file> or 'local-dir:<folder>' "
            "(timm, official FB / FCMAE, HF transformers and maskconv layouts are all read)."
        )
    model = fn(**kwargs)
    # as timm: lets saved weights name their model; the build kwargs let a checkpoint rebuild it
    model.pretrained_cfg = {"architecture": name.split(".", 1)[0], "model_kwargs": dict(kwargs)}
    if pretrained:
        from ._helpers import load_checkpoint

        load_checkpoint(model, pretrained, strict=True, drop_mismatched_head=True, allow_nonfinite=allow_nonfinite,
                        allow_non_float=allow_non_float)
    return model
