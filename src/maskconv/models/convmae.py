"""ConvMAE / MCMAE backbone: a hybrid conv -> transformer encoder (the official ``ConvViT``).

Paper: Gao et al., "ConvMAE: Masked Convolution Meets Masked Autoencoders" (NeurIPS 2022, arXiv:2205.03892).
Origin: Alpha-VL/ConvMAE (MIT-licensed code; ``vision_transformer.py`` CBlock / PatchEmbed / ConvViT,
``models_convvit.py`` fine-tuning model, ``util/lr_decay.py``).

Layout (total stride ``4 * patch_size`` = 16 by default):
stage 1: ``patch_embed1`` (conv k=s=patch_size -> LN -> GELU) + ``blocks1`` (CBlocks, H/4)
stage 2: ``patch_embed2`` (k=s=2) + ``blocks2`` (CBlocks, H/8)
stage 3: ``patch_embed3`` (k=s=2) -> tokens -> ``patch_embed4`` (Linear) + ``pos_embed`` -> ``blocks3`` (ViT blocks)
head: global average pool -> ``fc_norm`` -> ``head`` (the official fine-tuning form, ``global_pool=True``).

Parameter names are the official ones, so official fine-tuned checkpoints load as they are and official
pretraining checkpoints load after dropping the decoder / fusion / final-norm keys (``checkpoint_filter_fn``).
The masked pretraining (masked depthwise input, multi-scale fusion, decoder) lives in ``pretrain/convmae.py``.

Grids come from the input: any H, W divisible by the total stride. The learnable ``pos_embed`` is stored for
``img_size`` (default 224, the official table) and resampled bicubically for other grids, as timm's ViTs.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from ..layers import LayerNorm, LayerNorm2d, Mlp, pointwise
from ..layers.pos_embed import resample_pos_embed, sincos_pos_embed_2d
from ..layers.transformer import Block
from ._registry import register_checkpoint_filter, register_model
from ._features import check_image_input, feature_indices

__all__ = ["CBlock", "ConvViT", "PatchEmbed", "checkpoint_filter_fn"]

# The official CBlock and PatchEmbed build ``nn.LayerNorm(dim)`` (eps 1e-5) and ignore the model's
# ``norm_layer``; only the transformer blocks and the final norms use eps 1e-6.
_CONV_LN_EPS = 1e-5


class PatchEmbed(nn.Module):
    """Conv k=s=patch -> LayerNorm over channels -> GELU (the official ConvMAE PatchEmbed, keys ``proj``, ``norm``)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=_CONV_LN_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H/p, W/p)
        return self.act(self.norm(self.proj(x)))


class CBlock(nn.Module):
    """x + drop_path(conv2(dw5x5(conv1(LN(x))))), then x + drop_path(mlp(LN(x))), mlp = 1x1 conv -> GELU -> 1x1 conv
    (official ``CMlp``: the shared ``Mlp`` with 1x1-conv weights, keys ``mlp.fc1`` / ``mlp.fc2``).

    ``hidden`` (B, 1, H, W) bool, True = masked: zeroes the depthwise conv's input there (masked convolution).
    As the official block, nothing else is masked: masked positions keep their own values on the residual
    and MLP paths, but no spatial op ever reads them, so visible positions never see masked pixels.

    Named sub-steps, the only places the block's ops are written: ``mix_in`` (LN -> 1x1 conv), ``spatial`` (the
    depthwise 5x5 conv, the one op that mixes positions), ``mix_out`` (1x1 conv) and ``channel`` (LN -> MLP). The
    pointwise ones take (B, C, H, W) maps (the official ops, run as they are) or (N, C) tokens (``forward_last``
    / ``pointwise``: the same weights over the last dim). ``forward`` and ConvMAE's gathered path
    (``pretrain/convmae.py``) are compositions of them.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=_CONV_LN_EPS)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # official name for the depthwise 5x5 conv
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=_CONV_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), use_conv=True, channels_first=True)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def mix_in(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) or (N, C) -> same
        return self.conv1(self.norm1(x)) if x.ndim == 4 else pointwise(self.norm1.forward_last(x), self.conv1)

    def spatial(self, y: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.attn(y)

    def mix_out(self, y: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) or (N, C) -> same
        return self.conv2(y) if y.ndim == 4 else pointwise(y, self.conv2)

    def channel(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) or (N, C) -> same
        return self.mlp(self.norm2(x) if x.ndim == 4 else self.norm2.forward_last(x))

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, H, W)
        y = self.mix_in(x)
        if hidden is not None:
            y = y.masked_fill(hidden, 0)
        x = x + self.drop_path(self.mix_out(self.spatial(y)))
        return x + self.drop_path(self.channel(x))


class ConvViT(nn.Module):
    """ConvMAE's encoder in its fine-tuning form: learnable pos-embed (initialised from 2-D sin-cos), global
    average pool -> ``fc_norm`` -> ``head``; no multi-scale fusion branch (that is pretraining-only)."""

    first_conv = "patch_embed1.proj"  # adapted when loading weights made for another ``in_chans``
    classifier = "head"  # classifier key prefix (timm's pretrained_cfg['classifier']), read by load_checkpoint

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, int, int] = (256, 384, 768),
        depths: tuple[int, int, int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratios: tuple[float, float, float] = (4.0, 4.0, 4.0),
        patch_size: int = 4,
        img_size: int | tuple[int, int] = 224,
        qkv_bias: bool = True,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; ConvViT uses 'avg' (official fc_norm form)")
        if len(embed_dims) != 3 or len(depths) != 3 or len(mlp_ratios) != 3:
            raise ValueError(f"embed_dims {embed_dims}, depths {depths} and mlp_ratios {mlp_ratios} need 3 entries each")
        if in_chans < 1 or patch_size < 1:
            raise ValueError(f"in_chans ({in_chans}) and patch_size ({patch_size}) must be >= 1")
        if embed_dims[2] % 4:
            raise ValueError(f"embed_dims[2]={embed_dims[2]} must be a multiple of 4 (2-D sin-cos position embedding)")
        self.in_chans, self.num_classes, self.patch_size = in_chans, num_classes, patch_size
        self.embed_dims, self.depths = tuple(embed_dims), tuple(depths)
        self.stride = patch_size * 4  # total stride: the pixel patch of one stage-3 token (MAE patch size)
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if ih < self.stride or iw < self.stride or ih % self.stride or iw % self.stride:
            raise ValueError(f"img_size {(ih, iw)} must be a positive multiple of the total stride {self.stride} "
                             f"(patch_size {patch_size} x 4)")
        self.pos_grid = (ih // self.stride, iw // self.stride)  # grid of the stored pos_embed table
        c1, c2, c3 = embed_dims
        self.patch_embed1 = PatchEmbed(in_chans, c1, patch_size)
        self.patch_embed2 = PatchEmbed(c1, c2, 2)
        self.patch_embed3 = PatchEmbed(c2, c3, 2)
        self.patch_embed4 = nn.Linear(c3, c3)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], c3))
        dp = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: works under meta
        d1, d2, d3 = depths
        self.blocks1 = nn.ModuleList([CBlock(c1, mlp_ratios[0], dp[i]) for i in range(d1)])
        self.blocks2 = nn.ModuleList([CBlock(c2, mlp_ratios[1], dp[d1 + i]) for i in range(d2)])
        self.blocks3 = nn.ModuleList([Block(c3, num_heads, mlp_ratios[2], qkv_bias=qkv_bias, drop_path=dp[d1 + d2 + i])
                                      for i in range(d3)])
        self.fc_norm = LayerNorm(c3)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = self.head_hidden_size = c3
        self.feature_info = [dict(num_chs=c, reduction=patch_size * 2**i, module=f"blocks{i + 1}")
                             for i, c in enumerate(embed_dims)]
        self.grad_checkpointing = False
        self.apply(_init_weights)
        with torch.no_grad():  # official fine-tuning starts from the pretraining's fixed sin-cos table
            self.pos_embed.copy_(sincos_pos_embed_2d(c3, self.pos_grid, device=self.pos_embed.device).unsqueeze(0))
            if head_init_scale != 1.0 and isinstance(self.head, nn.Linear):
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    # ---- timm model contract -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a (B, in_chans, H, W) tensor the strides allow."""
        check_image_input(x, self.in_chans, self.stride, "the model's total stride")

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The (1, h*w, C) position table for an h x w token grid (the stored one, resampled if needed)."""
        return resample_pos_embed(self.pos_embed, (h, w), old_size=self.pos_grid, num_prefix_tokens=0)

    def run_blocks(self, x: torch.Tensor, blocks, *args, step=None) -> torch.Tensor:
        """Run ``blocks`` on ``x`` in order, each under activation checkpointing when ``set_grad_checkpointing`` is
        on and a gradient is taken. A block runs as ``blk(x, *args)`` (e.g. a CBlock's ``hidden`` mask), or as
        ``step(blk, x, *args)`` (ConvMAE's gathered path: ``pretrain.convmae.cblock_gather``)."""
        for blk in blocks:
            fn, fargs = (blk, (x, *args)) if step is None else (step, (blk, x, *args))
            x = checkpoint(fn, *fargs, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else fn(*fargs)
        return x

    def _stages(self, x: torch.Tensor, last: int = 2):
        """Yield the stage outputs (B, C_i, H_i, W_i) up to stage index ``last``."""
        self.check_input(x)
        x = self.run_blocks(self.patch_embed1(x), self.blocks1)
        yield x
        if last < 1:
            return
        x = self.run_blocks(self.patch_embed2(x), self.blocks2)
        yield x
        if last < 2:
            return
        x = self.patch_embed3(x)  # (B, C3, h, w)
        b, c, h, w = x.shape
        t = self.patch_embed4(x.flatten(2).transpose(1, 2)) + self.pos_embed_for(h, w)  # (B, L, C3)
        t = self.run_blocks(t, self.blocks3)
        yield t.transpose(1, 2).reshape(b, c, h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_chans, H, W) -> (B, C3, H/16, W/16)
        *_, out = self._stages(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, C3, h, w)
        x = self.fc_norm(x.mean((2, 3)))  # (B, C3): global pool over tokens, then fc_norm (official global_pool)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs as (B, C, h, w) maps (timm's signature). ``indices``: last n stages (int) or stage indices
        (list). Returns ``(final_features, [maps])`` or only the list. ``norm`` is accepted for timm compatibility:
        the fine-tuning form has no norm on token maps (``fc_norm`` follows the pooling)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take = feature_indices(indices, 3)
        last = max(take) if (stop_early or intermediates_only) else 2
        out, y = [], None
        for i, y in enumerate(self._stages(x, last)):
            if i in take:
                out.append(y)
        return out if intermediates_only else (y, out)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; ConvViT uses 'avg'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def get_classifier(self) -> nn.Module:
        return self.head

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.blocks1, *self.blocks2, *self.blocks3]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}  # official ConvViT.no_weight_decay

    def num_lr_layers(self, scheme: str = "single") -> int:
        """Largest layer id for layer-wise lr decay (official ``util/lr_decay.py``: ``len(blocks3) + 1``)."""
        if scheme != "single":
            raise ValueError(f"layer-decay scheme {scheme!r} is not defined for ConvViT: use 'single'")
        return len(self.blocks3) + 1

    def layer_id(self, name: str, scheme: str = "single") -> int:
        """Official ConvMAE rule: pos_embed, patch_embed*, blocks1, blocks2 -> 0; blocks3.i -> i+1; rest -> top."""
        top = self.num_lr_layers(scheme)
        if name in ("pos_embed", "cls_token") or name.startswith(("patch_embed", "blocks1.", "blocks2.")):
            return 0
        m = re.match(r"blocks3\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else top


def _init_weights(m: nn.Module) -> None:
    """Official ConvViT init: trunc_normal(std .02) Linear weights, zero biases; LayerNorm 1 / 0; convs keep
    PyTorch's default init (the official code does not touch them)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---- checkpoint layouts -----------------------------------------------------------------------------------
# Official pretraining keys that are not part of the backbone: fusion convs, final norm, decoder, mask token.
_PRETRAIN_ONLY = re.compile(r"^(stage[12]_output_decode|norm|decoder_\w+|mask_token)(\.|$)")
_DECODER = re.compile(r"^(stage[12]_output_decode|decoder_\w+|mask_token)(\.|$)")  # only a pretraining state has these


def detect_layout(sd: dict) -> str:
    """'official-pretrain' (MaskedAutoencoderConvViT) or 'official' (ConvViT fine-tuning with global_pool = ours).

    An official fine-tuning state trained with ``--cls_token`` (global_pool off: final ``norm`` + ``head``, no
    ``fc_norm``) is refused: its head reads the final-normed *first patch token* (``models_convvit.py``; ConvViT
    has no cls token), a head this ConvViT does not build, and it must never pass as a pretraining state. A final
    ``norm`` with neither ``head`` nor decoder keys fits both a pretraining encoder and such a backbone: read as
    pretraining, with a warning naming both."""
    keys = list(sd)
    if not any(k.startswith(("patch_embed1.", "blocks3.")) for k in keys):
        raise ValueError("unrecognised checkpoint layout: expected ConvMAE keys ('patch_embed1.proj.weight', "
                         f"'blocks3.0.attn.qkv.weight', ...); first keys are {keys[:5]}")
    fc_norm, norm = any(k.startswith("fc_norm.") for k in keys), any(k.startswith("norm.") for k in keys)
    head, decoder = any(k.startswith("head.") for k in keys), any(_DECODER.match(k) for k in keys)
    if fc_norm:
        if decoder or norm:
            raise ValueError("checkpoint mixes the official fine-tuning ('fc_norm.*') and pretraining ('norm.*', "
                             "decoder / fusion) layouts; refusing to guess which one it is")
        return "official"
    if norm and head:
        raise ValueError("checkpoint is an official ConvMAE fine-tuning state trained with --cls_token (layout "
                         "'official-cls-token': final 'norm' + 'head', no 'fc_norm'), not a pretraining state; its "
                         "classifier reads the normed first patch token, which maskconv's ConvViT (global average pool "
                         "-> fc_norm, the official default) does not build. To start from its backbone only (as from "
                         "pretraining: norm dropped, fc_norm at its init), remove the 'head.*' keys")
    if norm and not decoder:
        warnings.warn("ConvMAE checkpoint with a final 'norm' and no 'fc_norm', 'head' or decoder keys: it fits both "
                      "an official pretraining encoder and an 'official-cls-token' backbone; read as 'official-pretrain' "
                      "(norm dropped, fc_norm at its init)")
    return "official-pretrain" if norm or decoder else "official"


@register_checkpoint_filter(ConvViT)
def checkpoint_filter_fn(state_dict: dict, model: ConvViT) -> tuple[dict, str]:
    """Map a ConvMAE state dict to the backbone: the official fine-tuning layout is ours; the official
    pretraining layout loses its decoder / fusion / final-norm keys (``fc_norm`` is filled with the model's own
    init values and ``head`` is reported missing: official fine-tuning starts both from init); from a maskconv
    ``ConvMAE`` objective's state the ``encoder.*`` keys are taken. A pos-embed table stored for another grid (same
    width) is resampled to the model's; nothing is reshaped."""
    if any(k.startswith("encoder.patch_embed1.") for k in state_dict):  # a maskconv pretraining objective
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    layout = detect_layout(state_dict)
    sd = {k: v for k, v in state_dict.items() if not (layout == "official-pretrain" and _PRETRAIN_ONLY.match(k))}
    if layout == "official-pretrain":  # no fc_norm there: it starts at the model's init (1, 0), as official fine-tuning
        for k, v in model.fc_norm.state_dict().items():
            sd.setdefault(f"fc_norm.{k}", v.clone())
    pe, own = sd.get("pos_embed"), model.pos_embed
    if pe is not None and pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == own.shape[2] and pe.shape != own.shape:
        sd["pos_embed"] = resample_pos_embed(pe, model.pos_grid, num_prefix_tokens=0)
    return sd, layout


# ---- configs and registered variants -----------------------------------------------------------------------
_SIZES = {
    # official models_convmae.py / models_convvit.py (ConvMAE-B, 88M with a 1000-class head)
    "base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12),
    # not in Alpha-VL/ConvMAE: the small config of the FastConvMAE code line (moreh-dev/FastConvMAE
    # ``fastconvmae_convvit_small_patch16``), ViT-S widths; no official weights
    "small": dict(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6),
    # not in any official code line: the small config halved to ViT-Ti widths (192 wide, 3 heads in the
    # transformer stage), so MAE on vit_tiny and ConvMAE compare at one width (bench/dense_transfer.py)
    "tiny": dict(embed_dims=(64, 128, 192), depths=(2, 2, 11), num_heads=3),
}


@register_model
def convmae_tiny(**kw) -> ConvViT:
    """ConvMAE-T: widths 64/128/192, depths 2/2/11, 3 heads (the small config at ViT-Ti widths; see _SIZES)."""
    return ConvViT(**{**_SIZES["tiny"], **kw})


@register_model
def convmae_small(**kw) -> ConvViT:
    """ConvMAE-S: widths 128/256/384, depths 2/2/11, 6 heads (FastConvMAE's small config; see _SIZES)."""
    return ConvViT(**{**_SIZES["small"], **kw})


@register_model
def convmae_base(**kw) -> ConvViT:
    """ConvMAE-B (official ``convvit_base_patch16`` / ``convmae_convvit_base_patch16``)."""
    return ConvViT(**{**_SIZES["base"], **kw})


# ---- tiny variants for fast tests (not published architectures) -------------------------------------------
@register_model
def test_convmae(**kw) -> ConvViT:
    """Widths 8/16/32, depths 1/1/2, 2 heads."""
    return ConvViT(**{**dict(embed_dims=(8, 16, 32), depths=(1, 1, 2), num_heads=2, img_size=64), **kw})
