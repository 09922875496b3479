"""timm interop: build maskconv's models with ``timm.create_model`` (and so with libraries built on timm).

``register_with_timm()`` registers every maskconv model in timm's registry as ``maskconv_<name>`` (e.g.
``maskconv_slak_tiny``): timm has no ``maskconv_*`` names, so nothing of timm's is shadowed, whatever the timm
version (docs/DECISIONS.md). The entrypoints build through timm's ``build_model_with_cfg``, so timm's
``features_only`` (maskconv's ``FeatureNet``, models/dense.py, over our ``forward_intermediates``), its
``pretrained=True`` loading from ``local-dir:`` / ``hf-hub:`` folders or ``pretrained_cfg_overlay=dict(file=...)``
(through the family's checkpoint filter, so official layouts read as in maskconv) all work. Registration is an
explicit call, never a side effect of ``import maskconv``; it adds nothing but the entries in timm's registry
(timm's ``register_model`` also appends the names to this module's ``__all__``; ``__getattr__`` resolves them).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._registry import checkpoint_filter_for, list_models, model_entrypoint

__all__ = ["TIMM_BUILD_OPTIONS", "TIMM_PREFIX", "default_pretrained_cfg", "maskconv_name", "register_with_timm", "timm_name"]

TIMM_PREFIX = "maskconv_"
# what timm's create_model passes an entrypoint besides the model's own arguments (``build_model_with_cfg``'s)
TIMM_BUILD_OPTIONS = ("pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices", "feature_cls", "feature_cfg",
              "pretrained_model_args", "pretrained_strict", "kwargs_filter", "pruned")


def timm_name(name: str) -> str:
    """The timm registry name of maskconv model ``name`` (``slak_tiny`` -> ``maskconv_slak_tiny``)."""
    return TIMM_PREFIX + name


def maskconv_name(name: str) -> str:
    """Inverse of ``timm_name``; a name without the prefix is returned as it is (timm's own names that maskconv
    also has, e.g. a ``convnextv2_atto`` folder written by timm)."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name


def register_with_timm() -> list[str]:
    """Register every maskconv model in timm's registry as ``maskconv_<name>``; returns the timm names.

    Idempotent (a name already registered is left as it is). Needs timm (``pip install timm``).
    """
    try:
        from timm.models import is_model, register_model
    except ImportError as e:
        raise ImportError("register_with_timm needs timm: pip install timm") from e
    names = []
    for name in list_models():
        tname = timm_name(name)
        if not is_model(tname):
            register_model(_entrypoint(name, tname))
        names.append(tname)
    return names


def __getattr__(attr: str) -> Callable[..., nn.Module]:
    """``maskconv.models._timm.maskconv_<name>``: the registered entrypoint (keeps ``__all__`` truthful)."""
    if attr.startswith(TIMM_PREFIX):
        try:
            from timm.models import is_model, model_entrypoint as timm_entrypoint
        except ImportError:  # no timm: nothing was registered
            is_model = None
        if is_model is not None and is_model(attr):
            return timm_entrypoint(attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _entrypoint(name: str, tname: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _build(name, tname, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = tname
    entrypoint.__module__ = __name__  # timm files the name under this module ('_timm' in timm.list_modules())
    entrypoint.__doc__ = f"maskconv's ``{name}`` (``maskconv.create_model({name!r})``), built by timm."
    return entrypoint


def default_pretrained_cfg(model: nn.Module, architecture: str) -> dict:
    """timm's ``pretrained_cfg`` fields for a maskconv model: input, normalisation (ImageNet, maskconv's default),
    the stem conv and classifier names timm adapts / drops when loading weights."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    return dict(architecture=architecture, input_size=(model.in_chans, 224, 224), fixed_input_size=False,
                interpolation="bicubic", crop_pct=0.875, crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                num_classes=model.num_classes, first_conv=getattr(model, "first_conv", None),
                classifier=getattr(model, "classifier", "head.fc"))


def _timm_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: the family's checkpoint filter (official / HF layouts -> ours)."""
    fn = checkpoint_filter_for(model)
    return fn(state_dict, model)[0] if fn is not None else state_dict


def _build(name: str, tname: str, pretrained: bool, pretrained_cfg=None, **kwargs) -> nn.Module:
    from timm.models import build_model_with_cfg

    from .dense import FeatureNet
    from .vit import VisionTransformer

    fn = model_entrypoint(name)
    with torch.device("meta"):  # this build's stem, classifier and levels, without allocating weights
        shape = fn(**{k: v for k, v in kwargs.items() if k not in TIMM_BUILD_OPTIONS})
    if pretrained_cfg is None:  # a plain name: our defaults (a local-dir / hf-hub config brings its own)
        pretrained_cfg = default_pretrained_cfg(shape, tname)
    # timm's defaults for features_only: the last 3 blocks of a ViT (as timm's ViT), every stage of the others.
    # The wrapper is maskconv's FeatureNet (models/dense.py), the one features_only implementation; block maps
    # for a ViT, as timm's.
    levels = 3 if isinstance(shape, VisionTransformer) else tuple(range(len(shape.feature_info)))
    return build_model_with_cfg(lambda **kw: fn(**kw), tname, pretrained, pretrained_cfg=pretrained_cfg,
                                pretrained_filter_fn=_timm_filter,
                                feature_cfg=dict(feature_cls=FeatureNet, out_indices=levels, pyramid=False), **kwargs)
