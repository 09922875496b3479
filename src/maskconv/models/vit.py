"""Vision Transformer (ViT) backbones, as used by MAE.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words" (arXiv:2010.11929); He et al., "Masked
Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377). Origin: google-research/vision_transformer,
facebookresearch/mae (``models_vit.py``; code CC-BY-NC-4.0 like its weights), timm's ``vision_transformer.py``.
Parameter names and shapes follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.*``, ``norm`` / ``fc_norm``, ``head``) so a state dict is interchangeable with timm's
same-named model; MAE's checkpoints use the same names, and ``checkpoint_filter_fn`` reads them (fine-tuned and
pretrained, dropping the decoder).

Any input whose sides are multiples of the patch size works: the stored ``pos_embed`` (for ``img_size``) is
resampled to the input's grid (bicubic, antialiased, as timm's ``dynamic_img_size``). Unlike ConvNeXt,
``forward_features`` returns tokens (B, 1 + h*w, C) as timm's ViT does (``forward_head`` needs the cls token);
``forward_intermediates`` returns (B, C, h, w) maps without the cls token.
"""
from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block, LayerNorm, resample_pos_embed
from ._registry import register_checkpoint_filter, register_model
from ._features import check_image_input, feature_indices
from .vit_layouts import hf_vit_to_mae, is_hf_vit

__all__ = ["PatchEmbed", "VisionTransformer", "checkpoint_filter_fn"]


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> embed_dim: a Conv2d with kernel = stride = p (timm's ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, D, H/p, W/p)
        return self.proj(x)


class VisionTransformer(nn.Module):
    """ViT with a cls token and a learned absolute position table; ``global_pool`` 'token' (cls token, final
    ``norm``) or 'avg' (mean of patch tokens, then ``fc_norm``: MAE fine-tuning's ``global_pool=True``)."""

    first_conv = "patch_embed.proj"  # adapted when loading weights made for another ``in_chans``
    classifier = "head"  # classifier key prefix (timm's pretrained_cfg['classifier'])

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r}: use 'token' (cls token) or 'avg' (mean of patch tokens)")
        if in_chans < 1 or patch_size < 1 or depth < 1:
            raise ValueError(f"in_chans ({in_chans}), patch_size ({patch_size}) and depth ({depth}) must be >= 1")
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if ih % patch_size or iw % patch_size:
            raise ValueError(f"img_size {(ih, iw)} must be divisible by patch_size {patch_size}")
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.patch_size = self.stride = patch_size  # stride: the pixel patch of one token (the MAE patch size)
        self.pos_grid = (ih // patch_size, iw // patch_size)  # grid of the stored pos_embed table
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.drop_rate = drop_rate

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dp = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: works under a meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, init_values=init_values, drop_path=dp[i]) for i in range(depth)])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.grad_checkpointing = False
        self.init_weights()
        if head_init_scale != 1.0 and isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def init_weights(self) -> None:
        """timm's ViT init: pos_embed trunc_normal .02, cls_token normal 1e-6, Linear trunc_normal .02 / zero bias,
        LayerNorm 1 / 0, patch conv at PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)

    # ---- timm model contract -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor of whole patches."""
        check_image_input(x, self.in_chans, self.patch_size, "the patch size")

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + h*w, D) position table for a ``grid`` of patches (resampled if it is not the stored one)."""
        if tuple(grid) == self.pos_grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, old_size=self.pos_grid, num_prefix_tokens=1)

    def patchify_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> patch tokens with their position embedding (B, h*w, D) (no cls token), and (h, w)."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return x + self.pos_embed_for(grid)[:, 1:], grid

    def cls_with_pos(self) -> torch.Tensor:
        """The cls token plus its position row, (1, 1, D)."""
        return self.cls_token + self.pos_embed[:, :1]

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        t, grid = self.patchify_tokens(x)
        t = torch.cat([self.cls_with_pos().expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + h*w, D)
        return self.pos_drop(t), grid

    def run_blocks(self, x: torch.Tensor, blocks: nn.Module | None = None) -> torch.Tensor:
        for blk in self.blocks if blocks is None else blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() else blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_chans, H, W) -> (B, 1 + h*w, D)
        x, _ = self._embed(x)
        return self.norm(self.run_blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, 1 + h*w, D)
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Block outputs (timm's signature). ``indices``: last n blocks (int) or block indices (list).

        Returns ``(final tokens, [maps])`` or only the list with ``intermediates_only``; maps are (B, D, h, w)
        (``output_fmt='NLC'``: (B, h*w, D)), without the cls token unless ``return_prefix_tokens`` (then each item
        is ``(map, cls (B, 1, D))``). ``norm`` applies the final norm to every intermediate, as timm.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NLC'")
        take = feature_indices(indices, len(self.blocks), unit="blocks")
        b = x.shape[0]
        x, (gh, gw) = self._embed(x)
        last = max(take) if (stop_early or intermediates_only) else len(self.blocks) - 1
        out = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self.run_blocks(x, [blk])
            if i in take:
                y = self.norm(x) if norm else x
                t = y[:, self.num_prefix_tokens:]  # (B, h*w, D)
                if output_fmt == "NCHW":
                    t = t.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
                out.append((t, y[:, : self.num_prefix_tokens]) if return_prefix_tokens else t)
        return out if intermediates_only else (self.norm(x), out)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError(f"global_pool can't be changed after construction ({self.global_pool!r}; 'token' uses "
                             "norm, 'avg' fc_norm): build the model with the pooling you need")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards separately (their parameters are gathered just for their own forward)."""
        return list(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}  # timm's / MAE fine-tuning's list

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def num_lr_layers(self, scheme: str = "single") -> int:
        """Largest layer id for layer-wise lr decay (MAE ``util/lr_decay.py``: ``depth + 1``)."""
        if scheme != "single":
            raise ValueError(f"layer-decay scheme {scheme!r}: ViT has only 'single' (MAE's rule)")
        return len(self.blocks) + 1

    def layer_id(self, name: str, scheme: str = "single") -> int:
        """MAE's rule: cls_token / pos_embed / patch_embed -> 0, ``blocks.i`` -> i + 1, everything else -> depth + 1."""
        top = self.num_lr_layers(scheme)
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        m = re.match(r"blocks\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else top


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- checkpoint layouts -----------------------------------------------------------------------------------
_MAE_DECODER = ("decoder_", "mask_token")  # MAE pretraining keys that are not part of the backbone


@register_checkpoint_filter(VisionTransformer)
def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer) -> tuple[dict, str]:
    """Map a ViT state dict to ours; returns ``(state_dict, layout)``.

    Layouts: 'timm' (= ours; also official MAE fine-tuned files, which use the same names under ``model``),
    'mae-pretrain' (official MAE pretraining: decoder keys dropped), 'hf-timm' / 'hf-mae-pretrain' (HF transformers
    ViT / ViTMAE, renamed by ``vit_layouts.hf_vit_to_mae``); a maskconv MAE objective's state
    (``encoder.*``) is unwrapped first. ``pos_embed`` is
    resampled to the model's grid (as MAE ``interpolate_pos_embed`` / timm). MAE pretraining checkpoints hold the
    final ``norm``; into an ``fc_norm`` ('avg') model it is dropped and ``fc_norm`` starts at its LayerNorm init,
    exactly as MAE's ``main_finetune.py`` does (with a warning). A classifier fine-tuned with the cls token (``norm``
    and ``head``, no ``fc_norm``) is never read as such a pretraining state: into an 'avg' model it is an error.
    No reshapes: only ``pos_embed`` is resampled (another grid, same width).
    """
    hf = is_hf_vit(state_dict)
    if hf:  # HF transformers ViT / ViTMAE: renamed to timm / MAE names, then read as those (models/vit_layouts.py)
        state_dict = hf_vit_to_mae(state_dict)
    elif any(k.startswith("encoder.patch_embed.") for k in state_dict):  # a maskconv pretraining objective
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    keys = list(state_dict)
    if not any(k.startswith("patch_embed.") for k in keys) or "pos_embed" not in state_dict:
        raise ValueError("unrecognised checkpoint layout: expected ViT keys in timm/MAE layout ('patch_embed.proj.weight',"
                         f" 'pos_embed', 'blocks.0.attn.qkv.weight'); first keys are {keys[:5]}")
    pretrain = any(k.startswith(_MAE_DECODER) for k in keys)
    layout = ("hf-" if hf else "") + ("mae-pretrain" if pretrain else "timm")
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_MAE_DECODER)}
    if "dist_token" in sd or any(k.startswith("head_dist.") for k in sd):
        raise ValueError("DeiT distilled checkpoints (dist_token, head_dist) are not supported")
    pe = sd["pos_embed"]
    if pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[1] != model.pos_embed.shape[1] and pe.shape[-1] == model.embed_dim:
        n = pe.shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"checkpoint pos_embed has {n} grid rows, not a square grid; resample it first")
        sd["pos_embed"] = resample_pos_embed(pe, model.pos_grid, old_size=(side, side), num_prefix_tokens=1)
    if isinstance(model.fc_norm, nn.LayerNorm) and "fc_norm.weight" not in sd and "norm.weight" in sd:
        if any(k.startswith("head.") for k in sd):  # a classifier state: its head reads the normed cls token
            raise ValueError("checkpoint is a classifier fine-tuned with global_pool='token' (final 'norm' + 'head', no "
                             "'fc_norm'), not a pretraining state: build the model with global_pool='token'")
        what = "an MAE pretraining state" if pretrain else ("an MAE pretraining encoder, or a global_pool='token' "
                                                            "backbone saved without its classifier")
        warnings.warn(f"checkpoint has a final 'norm' and no 'fc_norm' ({what}) but the model pools with 'fc_norm' "
                      "(global_pool='avg'): read as pretraining, norm dropped, fc_norm left at its init (as MAE "
                      "main_finetune.py)")
        sd.pop("norm.weight")
        sd.pop("norm.bias", None)
        sd.update({f"fc_norm.{k}": v.detach().clone() for k, v in model.fc_norm.state_dict().items()})
    elif isinstance(model.norm, nn.LayerNorm) and "norm.weight" not in sd and "fc_norm.weight" in sd:
        raise ValueError("checkpoint was fine-tuned with global_pool='avg' (fc_norm, no final norm): build the model "
                         "with global_pool='avg'")
    return sd, layout


# ---- configs and registered variants (timm's names; shapes from timm vision_transformer.py / mae models_vit.py) ----
_SIZES = {  # patch, embed_dim, depth, heads
    "tiny": (16, 192, 12, 3),
    "small": (16, 384, 12, 6),
    "base": (16, 768, 12, 12),
    "large": (16, 1024, 24, 16),
    "huge": (14, 1280, 32, 16),  # MAE's and timm's ViT-H uses 14x14 patches
}


def _create(size: str, **kwargs) -> VisionTransformer:
    p, d, depth, heads = _SIZES[size]
    return VisionTransformer(**{**dict(patch_size=p, embed_dim=d, depth=depth, num_heads=heads), **kwargs})


@register_model
def vit_tiny_patch16_224(**kw) -> VisionTransformer:
    return _create("tiny", **kw)


@register_model
def vit_small_patch16_224(**kw) -> VisionTransformer:
    return _create("small", **kw)


@register_model
def vit_base_patch16_224(**kw) -> VisionTransformer:
    """ViT-B/16; MAE's ``vit_base_patch16`` is this with ``global_pool='avg'``."""
    return _create("base", **kw)


@register_model
def vit_large_patch16_224(**kw) -> VisionTransformer:
    """ViT-L/16; MAE's ``vit_large_patch16`` is this with ``global_pool='avg'``."""
    return _create("large", **kw)


@register_model
def vit_huge_patch14_224(**kw) -> VisionTransformer:
    """ViT-H/14; MAE's ``vit_huge_patch14`` is this with ``global_pool='avg'``."""
    return _create("huge", **kw)


# ---- tiny variant for fast tests (timm's ``test_vit``: same name, same shapes) ------------------------------
@register_model
def test_vit(**kw) -> VisionTransformer:
    """img 160, patch 16, width 64, 6 blocks, 2 heads, mlp ratio 3 (timm's test_vit)."""
    return VisionTransformer(**{**dict(img_size=160, patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=3.0),
                                **kw})
