"""ConvMAE pretraining objective: masked convolution in stages 1-2, MAE on the visible stage-3 tokens,
multi-scale fusion, MAE decoder, norm-pix loss on masked 16x16 patches.

Paper: Gao et al., "ConvMAE: Masked Convolution Meets Masked Autoencoders" (arXiv:2205.03892); official code
Alpha-VL/ConvMAE ``models_convmae.py``.

The encoder is the plain ``ConvViT`` backbone (``maskconv.models.convmae``): same weights, same keys, so
``encoder_state_dict()`` loads strict into ``create_model(name, num_classes=0)``. This module owns what only
pretraining has, under the official names: ``stage1_output_decode`` / ``stage2_output_decode`` (fusion convs),
``norm`` (final LN), ``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``.

One random mask on the stage-3 grid (``masking.py`` convention: bool (B, h, w), True = masked) is upsampled
to stages 1-2, where it zeroes the input of every depthwise 5x5 conv. Two implementations of that semantics:

* ``sparse="dense"`` — the official computation: stages 1-2 run on every position.
* ``sparse="gather"`` (default) — pointwise work (LayerNorms, 1x1 convs, MLPs) runs on the visible positions
  only, gathered as (N_vis, C); the depthwise convs and the stride-2 embeddings see a map whose masked
  positions are zero. Visible outputs are the dense path's (masks align with every stride), tested equal.

Neither leaks: the depthwise conv is the only spatial op in a CBlock and its input is masked, so masked
pixels never reach a visible position (``tests/pretrain/test_convmae.py``; docs/DECISIONS.md).

Pixel targets: the official ``patchify`` hard-codes p=16 and square RGB images, and its ``unpatchify`` reads a
non-existent ``self.patch_embed`` (never called in training). Here both are the shared ``targets.py`` functions
with ``patch_size`` = the encoder's total stride, any channel count and non-square grids (reconstruction
pictures go through ``targets.unpatchify``).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..layers import LayerNorm, init_mae
from ..layers.pos_embed import sincos_pos_embed_2d
from ..layers.transformer import Block
from ..models import register_checkpoint_filter
from ..models.convmae import CBlock, ConvViT, PatchEmbed
from ._base import EncoderTypeError, MaskedImageObjective, MaskedOutput, check_objective_args, split_official_state
from ._tokens import gather_tokens, scatter_tokens
from .masking import upsample_mask, visible_index, visible_positions


ConvMAEOutput = MaskedOutput  # loss, pred (B, L, p*p*C), mask (B, h, w) bool


# ---- gathered stages 1-2 (pointwise work on visible positions only) ---------------------------------------
# Composes the CBlock's own sub-steps (``mix_in`` / ``spatial`` / ``mix_out`` / ``channel``), the ones its dense
# forward runs: only the token layout and the per-sample drop path are written here.
def _drop(blk: CBlock, y: torch.Tensor, b: int) -> torch.Tensor:
    """Stochastic depth per sample on sample-major tokens (N_vis, C) (every sample has N_vis / B of them)."""
    return blk.drop_path(y.view(b, -1, y.shape[-1])).view_as(y)


def cblock_gather(blk: CBlock, t: torch.Tensor, idx: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """``t`` (N_vis, C) visible tokens of an h x w map; only the depthwise conv sees the (zero-filled) map."""
    y = blk.spatial(scatter_tokens(blk.mix_in(t), idx, b, h, w))  # masked inputs are zero = the masked conv
    t = t + _drop(blk, blk.mix_out(gather_tokens(y.permute(0, 2, 3, 1), idx)), b)
    return t + _drop(blk, blk.channel(t), b)


def _embed_gather(pe: PatchEmbed, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Patch-embed a (zero-filled) map and keep the visible cells: conv on the map, LN + GELU on tokens."""
    y = pe.proj(x)  # (B, C, H', W'); k = s: a visible output cell reads only visible input cells
    return pe.act(pe.norm.forward_last(gather_tokens(y.permute(0, 2, 3, 1), idx)))  # (N_vis, C)


# ---- objective ---------------------------------------------------------------------------------------------
class ConvMAE(MaskedImageObjective):
    """Masked autoencoder around a ``ConvViT`` encoder (official MaskedAutoencoderConvViT).

    Init as the official ``initialize_weights`` (``mae_init=True``): the encoder is re-initialised too —
    xavier_uniform for every Linear (zero bias) and for ``patch_embed3``'s conv viewed 2-D, LayerNorm 1 / 0,
    mask token normal std .02; the other convs keep PyTorch's default. Pass ``mae_init=False`` to keep the
    weights of an ``encoder`` you hand in. The encoder's ``pos_embed`` (sin-cos of its stored grid, as the
    official fixed 14x14 buffer) is frozen and read as the backbone reads it: exact at the stored grid, resampled
    for any other input size divisible by 16, so pretraining, fine-tuning and linear probing see the same
    positions. The decoder's table is the sin-cos table of the actual grid (official: a fixed buffer).
    """

    def __init__(self, encoder: ConvViT, mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = True, sparse: str = "gather", mae_init: bool = True):
        super().__init__()
        if not isinstance(encoder, ConvViT):
            raise EncoderTypeError(f"ConvMAE needs a maskconv ConvViT encoder (convmae_*), got {type(encoder).__name__}")
        check_objective_args(mask_ratio, decoder_dim, decoder_depth, decoder_heads, sparse)
        self.encoder = encoder
        # Frozen: fc_norm is unused in pretraining (DDP must not wait for its gradient), pos_embed is the fixed table.
        encoder.reset_classifier(0)
        encoder.fc_norm.requires_grad_(False)
        encoder.pos_embed.requires_grad_(False)
        self.mask_ratio, self.norm_pix_loss, self.sparse = mask_ratio, norm_pix_loss, sparse
        self.config = dict(mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                           decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss, sparse=sparse)  # saved with weights
        self.patch_size, self.in_chans = encoder.stride, encoder.in_chans
        c1, c2, c3 = encoder.embed_dims
        self.stage1_output_decode = nn.Conv2d(c1, c3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(c2, c3, 2, stride=2)
        self.norm = LayerNorm(c3)
        self.decoder_embed = nn.Linear(c3, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        for m in (self.norm, self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_mae)
        if mae_init:
            encoder.apply(init_mae)
            w = encoder.patch_embed3.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # "like nn.Linear", as the official code
            with torch.no_grad():  # the fixed sin-cos table (a handed-in encoder may hold a learned one)
                encoder.pos_embed.copy_(sincos_pos_embed_2d(c3, encoder.pos_grid, device=w.device)[None])
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- encoder -------------------------------------------------------------------------------------------
    def _stages12_dense(self, x: torch.Tensor, mask: torch.Tensor, keep: int):
        """Official: every position computed, depthwise inputs masked. Returns the stage-2 map and the fusion
        maps (B, C3, h, w) of stages 1 and 2."""
        enc = self.encoder
        x = enc.run_blocks(enc.patch_embed1(x), enc.blocks1, upsample_mask(mask, 4).unsqueeze(1))
        s1 = self.stage1_output_decode(x)
        x = enc.run_blocks(enc.patch_embed2(x), enc.blocks2, upsample_mask(mask, 2).unsqueeze(1))
        return x, s1, self.stage2_output_decode(x)

    def _stages12_gather(self, x: torch.Tensor, mask: torch.Tensor, keep: int):
        """Same visible values as ``_stages12_dense``; the stage-2 map is zero at masked positions."""
        enc, b = self.encoder, x.shape[0]
        out = []
        for i, (pe, blocks) in enumerate(((enc.patch_embed1, enc.blocks1), (enc.patch_embed2, enc.blocks2))):
            s = 4 >> i  # stage 1: 4x4 cells per token, stage 2: 2x2
            idx = visible_index(upsample_mask(mask, s), keep * s * s)
            h, w = mask.shape[1] * (4 >> i), mask.shape[2] * (4 >> i)
            t = _embed_gather(pe, x, idx)
            t = enc.run_blocks(t, blocks, idx, b, h, w, step=cblock_gather)
            x = scatter_tokens(t, idx, b, h, w)  # (B, C, H, W), zero at masked cells
            out.append((self.stage1_output_decode if i == 0 else self.stage2_output_decode)(x))
        return x, out[0], out[1]

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor, drawn: bool = False) -> torch.Tensor:
        """(B, C_in, H, W), mask (B, h, w) -> normed visible stage-3 tokens (B, L_vis, C3), in position order."""
        enc = self.encoder
        enc.check_input(images)
        keep = self.visible_count(images, mask, drawn)  # drawn: not read back (no sync)
        h, w = self.grid(images)
        mask = mask.to(images.device)
        stages = self._stages12_gather if self.sparse == "gather" else self._stages12_dense
        x, s1, s2 = stages(images, mask, keep)
        x = enc.patch_embed3(x)  # (B, C3, h, w)
        b, c = x.shape[:2]
        # the encoder's own (frozen sin-cos) table, resampled for a grid other than its stored one exactly as
        # fine-tuning / linear probing will see it; an fp32 parameter, so the residual stream stays fp32
        t = enc.patch_embed4(x.flatten(2).transpose(1, 2)) + enc.pos_embed_for(h, w)  # (B, L, C3)
        ids = visible_positions(mask, keep).unsqueeze(-1).expand(-1, -1, c)  # (B, L_vis, C3) static-size gather
        t = t.gather(1, ids)  # (B, L_vis, C3), position order
        t = enc.run_blocks(t, enc.blocks3)
        # multi-scale fusion: added to the blocks' output, before the final norm (official)
        fuse = (s1 + s2).flatten(2).transpose(1, 2).gather(1, ids)
        return self.norm(t + fuse)

    # ---- decoder + loss ------------------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L_vis, C3) visible tokens -> predictions (B, L, p*p*C_in) for every patch."""
        b, h, w = mask.shape
        x = self.decoder_embed(latent).to(self.mask_token.dtype)  # (B, L_vis, D); fp32 stream under autocast
        d = x.shape[-1]
        full = self.mask_token.reshape(1, d).expand(b * h * w, d)
        idx = visible_index(mask, x.shape[1])  # the positions the encoder kept
        x = full.index_copy(0, idx, x.reshape(-1, d)).view(b, h * w, d)  # mask tokens + visible
        x = x + sincos_pos_embed_2d(d, (h, w), dtype=x.dtype, device=x.device)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))


# ---- checkpoint layouts -----------------------------------------------------------------------------------
@register_checkpoint_filter(ConvMAE)
def checkpoint_filter_fn(state_dict: dict, model: ConvMAE) -> tuple[dict, str]:
    """Read a whole official ``MaskedAutoencoderConvViT`` state (encoder + fusion + decoder) into the objective:
    encoder keys gain ``encoder.``, the fixed ``decoder_pos_embed`` is dropped (computed per grid), and the
    encoder's pretraining-unused ``fc_norm`` keeps the model's own values. Our own layout passes through."""
    if any(k.startswith("encoder.") for k in state_dict):
        return dict(state_dict), "native"
    from ..models.convmae import checkpoint_filter_fn as backbone_filter

    sd = split_official_state(state_dict, model, backbone_filter, "ConvMAE")
    for k, v in model.encoder.fc_norm.state_dict().items():
        sd.setdefault(f"encoder.fc_norm.{k}", v.clone())
    return sd, "official-pretrain"
