"""The dense-prediction face of every family: ``create_model(name, features_only=True, out_indices=...)``.

``FeatureNet`` wraps a backbone and returns its per-stage maps as a list, with ``feature_info`` (channels,
reduction per output: timm's ``FeatureInfo`` methods), as timm's ``FeatureGetterNet`` does over
``forward_intermediates``; it is also what ``timm.create_model('maskconv_<name>', features_only=True)`` builds
(``models/_timm.py``), so there is one implementation. The backbone sits under ``model.`` (timm's key layout of
a features_only net), unchanged: its classifier weights stay, so a full classifier state loads strict into
``FeatureNet.model`` and the maps equal the classifier's ``forward_intermediates`` bit for bit.

Two options the detection / segmentation heads use (``heads/``):

* ``out_norm``: a LayerNorm2d on each output (``norms.<i>``), as the official ConvNeXt detection and
  segmentation backbones add one per out index (facebookresearch/ConvNeXt,
  object_detection/mmdet/models/backbones/convnext.py, ``norm{i}``); new weights, at their init.
* ``pyramid`` (ViT only): the simple feature pyramid of ViTDet (Li et al., "Exploring Plain Vision Transformer
  Backbones for Object Detection", ECCV 2022; facebookresearch/detectron2 projects/ViTDet ``SimpleFeaturePyramid``)
  from the last block's stride-p map: scale 4 = two stride-2 transposed convs (LN + GELU between), scale 2 = one,
  1 = the map itself, 1/2 = 2x2 max pool, so a plain ViT feeds an FPN at strides p/4, p/2, p, 2p (4..32 for
  p = 16). Channels D/4, D/2, D, D as ViTDet's; ViTDet's 1x1 + 3x3 output convs are left to the FPN above.
  ``pyramid=False`` gives block maps (timm's ViT default: the last 3 blocks).

ConvMAE gives its three stages (strides 4, 8, 16: its multi-scale stages, as ConvMAE's detection code feeds
them to an FPN, which adds the stride-32 level by max pooling).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import LayerNorm2d

__all__ = ["FeatureInfo", "FeatureNet", "SimpleFeaturePyramid", "freeze_unused"]


class FeatureInfo(list):
    """``feature_info`` of a features_only net: a list of ``dict(num_chs, reduction, module)`` with timm's
    ``FeatureInfo`` accessors (``channels()``, ``reduction()``, ``module_name()``)."""

    def channels(self, idx: int | None = None):
        return self[idx]["num_chs"] if idx is not None else [f["num_chs"] for f in self]

    def reduction(self, idx: int | None = None):
        return self[idx]["reduction"] if idx is not None else [f["reduction"] for f in self]

    def module_name(self, idx: int | None = None):
        return self[idx]["module"] if idx is not None else [f["module"] for f in self]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's rescaling of one stride-p map (B, D, H/p, W/p) into maps at ``scales`` (of 4, 2, 1, 0.5)."""

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, dim: int, scales: tuple[float, ...] = SCALES):
        super().__init__()
        bad = [s for s in scales if s not in self.SCALES]
        if bad or not scales:
            raise ValueError(f"pyramid scales {scales}: use some of {self.SCALES}")
        self.scales = tuple(scales)
        self.channels = []
        levels = []
        for s in self.scales:
            if s == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                self.channels.append(dim // 4)
            elif s == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
                self.channels.append(dim // 2)
            elif s == 1.0:
                layers = []
                self.channels.append(dim)
            else:
                layers = [nn.MaxPool2d(2, stride=2)]
                self.channels.append(dim)
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, D, h, w) -> [(B, C_s, h*s, w*s)]
        return [level(x) for level in self.levels]


def _is_vit(model: nn.Module) -> bool:
    from .vit import VisionTransformer

    return isinstance(model, VisionTransformer)


class FeatureNet(nn.Module):
    """Per-stage maps of ``model`` (a registered backbone): ``forward(x) -> [(B, C_i, H/r_i, W/r_i)]``.

    ``out_indices``: which stages (timm's ``indices``: tuple of stage indices, negative from the end; default
    every stage; ViT: the pyramid's levels, or with ``pyramid=False`` block indices, default the last 3).
    """

    def __init__(self, model: nn.Module, out_indices=None, out_norm: bool = False, pyramid: bool | None = None,
                 **timm_options):
        super().__init__()
        unknown = set(timm_options) - {"output_fmt", "feature_cls", "flatten_sequential", "no_rewrite",
                                       "return_dict", "norm", "prune", "default_hook_type"}
        if unknown:
            raise ValueError(f"features_only: unknown option(s) {', '.join(sorted(unknown))}")
        self.model = model
        vit = _is_vit(model)
        pyramid = vit if pyramid is None else pyramid
        if pyramid and not vit:
            raise ValueError(f"pyramid=True is ViTDet's simple feature pyramid for a plain ViT; "
                             f"{type(model).__name__} has its own stages")
        from ._features import feature_indices

        info = list(model.feature_info)
        if pyramid:
            n = len(SimpleFeaturePyramid.SCALES)
            levels = feature_indices(None if out_indices is None else _as_list(out_indices), n, unit="pyramid levels")
            self.pyramid = SimpleFeaturePyramid(model.embed_dim, tuple(SimpleFeaturePyramid.SCALES[i] for i in levels))
            p = model.patch_size
            self.feature_info = FeatureInfo(
                dict(num_chs=c, reduction=int(p / s), module=f"pyramid.levels.{k}")
                for k, (c, s) in enumerate(zip(self.pyramid.channels, self.pyramid.scales)))
            self.indices = [len(info) - 1]  # the pyramid reads the last block
        else:
            self.pyramid = None
            default = 3 if vit else None  # timm's defaults: the last 3 blocks of a ViT, every stage of the others
            self.indices = feature_indices(default if out_indices is None else _as_list(out_indices), len(info))
            self.feature_info = FeatureInfo(dict(info[i]) for i in self.indices)
        self.norms = nn.ModuleList([LayerNorm2d(c) for c in self.feature_info.channels()]) if out_norm else None
        self.stride = max(self.feature_info.reduction())  # inputs must be multiples of this
        freeze_unused(self.model, self.indices, 2 * max(info[i]["reduction"] for i in self.indices))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        if self.pyramid is not None:
            h, w = x.shape[-2:]
            if h % self.stride or w % self.stride:
                raise ValueError(f"input size {h}x{w} is not divisible by the pyramid's largest stride {self.stride}")
            maps = self.pyramid(maps[-1])
        if self.norms is not None:
            maps = [norm(m) for norm, m in zip(self.norms, maps)]
        return maps

    # ---- what the heads and the optimizer ask of a backbone -------------------------------------------
    def load_backbone(self, source, **kwargs):
        """Load a checkpoint in any layout ``load_checkpoint`` reads into the backbone (strict; a checkpoint
        without a classifier, e.g. a pretraining run's ``encoder.safetensors``, leaves the head at init)."""
        from ._helpers import load_checkpoint

        return load_checkpoint(self.model, source, strict=True, drop_mismatched_head=True, **kwargs)

    def num_lr_layers(self, scheme: str = "single") -> int:
        return self.model.num_lr_layers(scheme)

    def layer_id(self, name: str, scheme: str = "single") -> int:
        """The backbone's own layer ids (its official layer-decay rule); the per-output norms and the pyramid
        are new layers: the top id, as the official detection recipes give the ``norm{i}`` layers."""
        if name.startswith("model."):
            return self.model.layer_id(name[len("model."):], scheme)
        return self.num_lr_layers(scheme)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in nwd()} if callable(nwd) else set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def freeze_unused(model: nn.Module, indices, size: int) -> list[str]:
    """``requires_grad_(False)`` on every parameter of ``model`` that ``forward_intermediates(indices,
    intermediates_only=True)`` never reaches (the classifier head, a final norm, blocks after the last index);
    returns their names. Under DDP a trainable parameter that gets no gradient stops training at the second
    step ("Expected to have finished reduction in the prior iteration"); the weights stay in the state dict,
    so a classifier checkpoint still loads strict. Found by autograd on one ``size`` x ``size`` zero image in
    eval mode (BatchNorm statistics and the RNG are left untouched), not by a per-family list of names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    p0 = named[0][1]
    in_chans = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            maps = model.forward_intermediates(torch.zeros(1, in_chans, size, size, device=p0.device, dtype=p0.dtype),
                                               indices=indices, intermediates_only=True)
            total = sum(m.float().sum() for m in maps)
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        for m, training in modes:
            m.training = training
    unused = [(n, p) for (n, p), g in zip(named, grads) if g is None]
    for _, p in unused:
        p.requires_grad_(False)
    return [n for n, _ in unused]


def _as_list(indices):
    """timm's ``out_indices``: an int (the last n) stays; a tuple / list becomes a list."""
    return indices if isinstance(indices, int) else list(indices)
