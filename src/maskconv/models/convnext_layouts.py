"""ConvNeXt checkpoint layouts: timm / maskconv, official FB ConvNeXt and ConvNeXt-V2 (incl. the MinkowskiEngine
FCMAE encoder), HF transformers. ``checkpoint_filter_fn`` maps any of them to timm's keys (``models/convnext.py``),
reshaping only where a layout is known to store a tensor differently (``_KNOWN_RESHAPES``); SLaK's filter and the
FCMAE objective's filter build on it. ``to_hf`` writes HF transformers' layout (``hub.save_transformers``).

Sources: facebookresearch/ConvNeXt ``models/convnext.py``, facebookresearch/ConvNeXt-V2 ``models/convnextv2.py``,
``models/convnextv2_sparse.py``, ``models/fcmae.py`` and ``utils.py`` (``remap_checkpoint_keys``), HF transformers
``modeling_convnext(v2).py``, timm ``convnext.py`` (``checkpoint_filter_fn``).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from ._registry import register_checkpoint_filter
from .convnext import ConvNeXt

__all__ = ["checkpoint_filter_fn", "detect_layout", "fb_block_key", "known_reshapes", "to_hf"]

_FCMAE_DECODER = ("decoder", "mask_token", "proj.", "pred.")
# Key signatures of each layout; a state dict showing two of them is refused rather than read as the first.
_LAYOUT_KEYS = {
    "timm": lambda k: k.startswith("stem.") or (k.startswith("stages.") and ".blocks." in k),
    "hf": lambda k: k.startswith(("convnextv2.", "convnext.", "embeddings.patch_embeddings")),
    "fb": lambda k: k.startswith(("downsample_layers.", "encoder.downsample_layers.")),
}


def _me_key(k: str) -> bool:
    """A MinkowskiEngine module's key (conv ``kernel``, ``MinkowskiLinear.linear``, ``MinkowskiLayerNorm.ln``)."""
    return k.endswith(".kernel") or ".linear." in k or ".ln." in k


def detect_layout(sd: dict) -> str:
    """Name the layout of a ConvNeXt state dict: 'timm', 'fb', 'fb-sparse' (MinkowskiEngine FCMAE) or 'hf'.
    Keys of two layouts at once are an error naming both (never a guess)."""
    keys = list(sd)
    found = {name: next((k for k in keys if sign(k)), None) for name, sign in _LAYOUT_KEYS.items()}
    found = {name: k for name, k in found.items() if k is not None}
    me = next((k for k in keys if _me_key(k)), None)
    if me is not None:  # the FCMAE sparse encoder: the official FB names with MinkowskiEngine module names
        found["fb-sparse"] = found.pop("fb", me)
    if len(found) > 1:
        raise ValueError("checkpoint mixes ConvNeXt key layouts: " + ", ".join(f"{n} ({k!r})" for n, k in found.items())
                         + "; refusing to guess which one it is")
    if not found:
        raise ValueError(
            "unrecognised checkpoint layout: expected ConvNeXt keys in timm/maskconv ('stem.0.weight'), official FB "
            f"('downsample_layers.0.0.weight') or HF transformers layout; first keys are {keys[:5]}"
        )
    return next(iter(found))


def _me_kernel_to_conv(k: str, v: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel -> Conv2d weight. ME enumerates offsets with the first spatial axis fastest, hence
    the final transpose (official ``remap_checkpoint_keys``)."""
    kv = v.shape[0] if v.ndim in (2, 3) else 0
    ks = math.isqrt(kv)
    if kv == 0 or ks * ks != kv:
        raise ValueError(f"{k}: a MinkowskiEngine kernel is (k*k, C) or (k*k, in, out), got {tuple(v.shape)}")
    if v.ndim == 3:  # (kv, in, out)
        _, cin, cout = v.shape
        return v.permute(2, 1, 0).reshape(cout, cin, ks, ks).transpose(3, 2)
    c = v.shape[1]  # depthwise (kv, C)
    return v.permute(1, 0).reshape(c, 1, ks, ks).transpose(3, 2)


def fb_block_key(k: str) -> str:
    """Official FB block names -> timm's (``dwconv``, ``pwconv1/2``, ``grn.gamma/beta``); also names the official
    FCMAE decoder blocks (``decoder.i.*``)."""
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
    return k.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")


def _fb_to_timm(sd: dict, sparse: bool) -> dict:
    out = {}
    for key, v in sd.items():
        k = key[len("encoder."):] if key.startswith("encoder.") else key
        if any(k.startswith(p) or f".{p}" in k for p in _FCMAE_DECODER):
            continue  # FCMAE decoder / mask token: not part of the backbone
        if sparse:
            if k.endswith(".kernel"):
                k, v = k[: -len("kernel")] + "weight", _me_kernel_to_conv(key, v)
            k = k.replace(".ln.", ".").replace(".linear.", ".")
            if k.endswith("bias") and v.ndim == 2 and v.shape[0] == 1:  # ME conv biases are (1, C)
                v = v.flatten()
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = fb_block_key(k)
        if k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        elif k.startswith("norm."):
            k = "head." + k
        out[k] = v
    return out


def _hf_to_timm(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^convnext(v2)?\.", "", k)
        if k.startswith("classifier."):
            k = "head.fc." + k[len("classifier."):]
        elif k.startswith("layernorm."):
            k = "head.norm." + k[len("layernorm."):]
        elif k.startswith("pooler."):
            continue
        k = k.replace("embeddings.patch_embeddings.", "stem.0.").replace("embeddings.layernorm.", "stem.1.")
        k = re.sub(r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".layernorm.", ".norm.")
        k = k.replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.").replace(".grn.", ".mlp.grn.")
        k = k.replace(".layer_scale_parameter", ".gamma")
        out[k] = v
    return out


# The only reshapes the ConvNeXt filters do, per layout: storage forms each source's code is known to use for the
# same numbers. Every other tensor must already have the model's shape (load_checkpoint refuses it, naming the key
# and both shapes), so a tensor that merely has the right element count (a transposed classifier, an fc1 stored
# (in, out)) is never reinterpreted.
_MLP_WEIGHT = re.compile(r"(^|\.)mlp\.fc[12]\.weight$")
_GRN_PARAM = re.compile(r"(^|\.)mlp\.grn\.(weight|bias)$")


def _linear_as_conv1x1(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """nn.Linear (O, I) where the model keeps timm's ``conv_mlp`` 1x1 conv (O, I, 1, 1) (atto..nano)."""
    return v[:, :, None, None] if v.ndim == 2 and shape == (*v.shape, 1, 1) else v


def _conv1x1_as_linear(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A ``conv_mlp`` 1x1 conv (O, I, 1, 1) where the model keeps nn.Linear (O, I)."""
    return v[:, :, 0, 0] if v.ndim == 4 and tuple(v.shape) == (*shape, 1, 1) else v


def _grn_as_vector(lead: tuple) -> Callable:
    """GRN gamma/beta stored ``(*lead, C)`` -> timm's (C,)."""
    return lambda v, shape: v.reshape(shape) if len(shape) == 1 and tuple(v.shape) == (*lead, shape[0]) else v


_KNOWN_RESHAPES = {
    # timm's conv_mlp option stores the same MLP weights as Linear or 1x1 conv; GRN is (C,) already
    "timm": ((_MLP_WEIGHT, _linear_as_conv1x1), (_MLP_WEIGHT, _conv1x1_as_linear)),
    # official ConvNeXt(-V2) ``convnextv2.py``: nn.Linear pwconv, GRN (1, 1, 1, C)
    "fb": ((_MLP_WEIGHT, _linear_as_conv1x1), (_GRN_PARAM, _grn_as_vector((1, 1, 1)))),
    # official ``convnextv2_sparse.py``: MinkowskiLinear (O, I), MinkowskiGRN (1, C); kernels and (1, C) conv
    # biases are converted by the official remap (_me_kernel_to_conv) during renaming
    "fb-sparse": ((_MLP_WEIGHT, _linear_as_conv1x1), (_GRN_PARAM, _grn_as_vector((1,)))),
    # HF transformers ``ConvNextV2GRN``: (1, 1, 1, C); nn.Linear pwconv
    "hf": ((_MLP_WEIGHT, _linear_as_conv1x1), (_GRN_PARAM, _grn_as_vector((1, 1, 1)))),
}


def known_reshapes(sd: dict, target: dict, layout: str) -> dict:
    """Apply ``layout``'s known storage differences (``_KNOWN_RESHAPES``) to ``sd`` for ``target``'s shapes."""
    out = dict(sd)
    for k, v in sd.items():
        if k in target and v.shape != target[k].shape:
            for pattern, fix in _KNOWN_RESHAPES[layout]:
                if pattern.search(k):
                    v = fix(v, tuple(target[k].shape))
            out[k] = v
    return out


@register_checkpoint_filter(ConvNeXt)
def checkpoint_filter_fn(state_dict: dict, model: ConvNeXt) -> tuple[dict, str]:
    """Map a ConvNeXt state dict in any known layout to ours, with only that layout's known reshapes
    (``_KNOWN_RESHAPES``). Returns ``(state_dict, layout)``."""
    if any(k.startswith("encoder.stem.") for k in state_dict):  # a maskconv pretraining objective's state
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    layout = detect_layout(state_dict)
    if layout == "timm":
        sd = dict(state_dict)
    elif layout == "hf":
        sd = _hf_to_timm(state_dict)
    else:
        sd = _fb_to_timm(state_dict, sparse=layout == "fb-sparse")
    return known_reshapes(sd, model.state_dict(), layout), layout


# ---- writing the HF transformers layout -------------------------------------------------------------------
def to_hf(model: ConvNeXt, label_names: list[str] | None = None) -> tuple[dict, dict]:
    """``(state_dict, config)`` of ``model`` in HF transformers' layout: ``ConvNextV2ForImageClassification`` for
    a V2 model (GRN), ``ConvNextForImageClassification`` for V1 (``ConvNextV2Model`` / ``ConvNextModel`` without a
    classifier); the inverse of ``_hf_to_timm``. ``config`` is the ``config.json`` transformers builds it from
    (``layer_norm_eps`` 1e-6: ours, and the official models', final norm; HF's default is 1e-12).
    Only what HF's classes can hold is written: a 7x7 depthwise conv, GRN without layer scale (V2) or layer scale
    without GRN (V1); SLaK and other kernels are refused."""
    if type(model) is not ConvNeXt or any(k != 7 for k in model.kernel_sizes):
        raise ValueError(f"HF transformers' ConvNeXt holds a plain 7x7 depthwise ConvNeXt; {type(model).__name__} with "
                         f"kernels {getattr(model, 'kernel_sizes', '?')} has no HF layout")
    sd = model.state_dict()
    v2 = any(_GRN_PARAM.search(k) for k in sd)
    gamma = any(k.endswith(".gamma") for k in sd)
    if v2 and gamma:
        raise ValueError("a ConvNeXt with both GRN and layer scale has no HF transformers layout")
    prefix = "convnextv2." if v2 else "convnext."
    out = {}
    for k, v in sd.items():
        if k.startswith("head.fc."):
            out["classifier." + k[len("head.fc."):]] = v
            continue
        k = re.sub(r"^stem\.0\.", "embeddings.patch_embeddings.", k)
        k = re.sub(r"^stem\.1\.", "embeddings.layernorm.", k)
        k = re.sub(r"^head\.norm\.", "layernorm.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2.", k)
        if _MLP_WEIGHT.search(k):
            v = _conv1x1_as_linear(v, tuple(v.shape[:2]))  # timm's conv_mlp 1x1 convs -> HF's nn.Linear
        if _GRN_PARAM.search(k):
            v = v.reshape(1, 1, 1, -1)  # HF ConvNextV2GRN stores (1, 1, 1, C)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".norm.", ".layernorm.").replace(".mlp.grn.", ".grn.")
        k = k.replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = re.sub(r"\.gamma$", ".layer_scale_parameter", k)
        out[prefix + k] = v
    n = model.num_classes
    kind = "ConvNextV2" if v2 else "ConvNext"
    labels = list(label_names) if label_names is not None else [f"LABEL_{i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} label names for {n} classes")
    config = {"architectures": [f"{kind}ForImageClassification" if n else f"{kind}Model"],
              "model_type": kind.lower(), "num_channels": model.in_chans, "patch_size": model.stem[0].kernel_size[0],
              "num_stages": len(model.dims), "hidden_sizes": list(model.dims), "depths": list(model.depths),
              "hidden_act": "gelu", "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": 224,
              "id2label": {str(i): name for i, name in enumerate(labels)},
              "label2id": {name: i for i, name in enumerate(labels)}}
    if not v2:
        config["layer_scale_init_value"] = 1e-6 if gamma else 0.0  # > 0 makes HF create layer_scale_parameter
    return out, config
