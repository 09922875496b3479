"""ViT checkpoint layouts of HF transformers: ``ViTMAEForPreTraining`` / ``ViTMAEModel`` (e.g. ``facebook/vit-mae-*``)
and ``ViTModel`` / ``ViTForImageClassification``, renamed to the timm / official MAE names ``vit.checkpoint_filter_fn``
and the MAE objective read (``patch_embed.proj``, ``blocks.i.attn.qkv``, ``decoder_blocks.i.*``, ``decoder_pred``).

Source: HF transformers ``models/vit_mae/modeling_vit_mae.py`` and ``models/vit/modeling_vit.py`` (separate
query / key / value Linears, concatenated here in timm's ``qkv`` order q, k, v); official facebookresearch/mae
``models_mae.py`` for the target names. No tensor is reshaped: every HF tensor already has timm's shape.
"""
from __future__ import annotations

import re
import warnings

import torch

__all__ = ["is_hf_vit", "hf_vit_to_mae"]

_HF_PATCH = re.compile(r"^(vit\.)?embeddings\.patch_embeddings\.projection\.")
# HF block -> timm block, in both HF namings: the files on the Hub (transformers 4: ``attention.attention.query``,
# ``intermediate.dense``) and transformers 5's modules (``attention.q_proj``, ``mlp.fc1``; ``conversion_mapping.py``)
_BLOCK = (("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
          ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
          ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."), ("mlp.fc1.", "mlp.fc1."),
          ("mlp.fc2.", "mlp.fc2."))
_QKV = re.compile(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight", "classifier.bias": "head.bias",
        "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed"}
# encoder blocks: ``encoder.layer.i`` (Hub files) / ``layers.i`` (transformers 5); decoder blocks:
# ``decoder.decoder_layers.i`` (Hub files, transformers 5 modules) / ``decoder.decoder_encoder.layer.i`` (what
# transformers 5.x ``save_pretrained`` writes: its reverse renaming of ``encoder.layer`` -> ``layers`` hits them)
_LAYER = re.compile(r"^(encoder\.layer|layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)$")
_QKV_NAME = {"q": "query", "k": "key", "v": "value"}


def is_hf_vit(state_dict: dict) -> bool:
    """True for a state dict in an HF transformers ViT / ViTMAE layout (``[vit.]embeddings.patch_embeddings.*``)."""
    return any(_HF_PATCH.match(k) for k in state_dict)


def hf_vit_to_mae(state_dict: dict) -> dict:
    """HF ViT / ViTMAE keys -> timm / official MAE keys (decoder ``decoder_*``, ``mask_token``), q/k/v -> qkv.
    HF ``ViTModel``'s ``pooler`` (a dense + tanh on the cls token that no classifier reads, not in timm's ViT) is
    dropped with a warning."""
    out, qkv = {}, {}
    pooler = [k for k in state_dict if k.startswith(("pooler.", "vit.pooler."))]
    if pooler:
        warnings.warn(f"HF ViTModel pooler {pooler} dropped: timm's ViT (and ViTForImageClassification) has no pooler")
    for key, v in state_dict.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if k.startswith("pooler."):
            continue
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        if k.startswith(("decoder.decoder_embed.", "decoder.decoder_norm.", "decoder.decoder_pred.")):
            out[k[len("decoder."):]] = v
            continue
        m = _LAYER.match(k)
        if m is None:
            raise ValueError(f"HF ViT / ViTMAE checkpoint key {key!r} has no timm / MAE counterpart")
        prefix = f"decoder_blocks.{m[2]}." if m[1].startswith("decoder.") else f"blocks.{m[2]}."
        rest = m[3]
        qm = _QKV.fullmatch(rest)
        if qm:
            qkv.setdefault((prefix, qm[3]), {})[qm[1] or _QKV_NAME[qm[2]]] = v
            continue
        new = next((rest.replace(a, b, 1) for a, b in _BLOCK if rest.startswith(a)), None)
        if new is None:
            raise ValueError(f"HF ViT / ViTMAE checkpoint key {key!r} has no timm / MAE counterpart")
        out[prefix + new] = v
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"HF checkpoint has {sorted(parts)} but not all of query/key/value {kind} for {prefix}attn")
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out
