"""MAE: masked autoencoder pretraining of a Vision Transformer.

Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377); official code
facebookresearch/mae ``models_mae.py``.

The encoder is the plain ``VisionTransformer`` (``maskconv.models.vit``): same weights, same keys, so
``encoder_state_dict()`` loads strict into ``create_model(name, num_classes=0)`` and timm's same-named model.
The objective owns what only pretraining has, under the official names: ``mask_token``, ``decoder_embed``,
``decoder_blocks``, ``decoder_norm``, ``decoder_pred``, so official pretraining checkpoints load directly.

The mask is made **outside** the encoder (``masking.py`` convention: bool (B, h, w), True = masked, the same
number of visible patches per sample) and passed in: with a given mask the forward is deterministic (HF's
ViTMAE draws its noise inside the model; docs/DECISIONS.md). Only the visible patch tokens (+ cls) enter the
encoder, so masked pixels can never influence the encoder output. The encoder's ``pos_embed`` is set to the
fixed 2-D sin-cos table of its stored grid at init and frozen (official: a fixed 14x14 table), and the encoder
reads it as the backbone does: exact at the stored grid, resampled for any other input size divisible by the
patch, so pretraining, fine-tuning and linear probing see the same positions. The decoder's table is the sin-cos
table of the actual grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layers import Block, LayerNorm, init_mae, sincos_pos_embed_2d
from ..models import register_checkpoint_filter
from ..models.vit import VisionTransformer
from ._base import EncoderTypeError, MaskedImageObjective, MaskedOutput, check_objective_args, split_official_state
from .masking import visible_positions

__all__ = ["MAE", "MAEOutput", "checkpoint_filter_fn"]


MAEOutput = MaskedOutput  # loss, pred (B, L, p*p*C), mask (B, h, w) bool


class MAE(MaskedImageObjective):
    """Masked autoencoder around a ``VisionTransformer`` (official ``MaskedAutoencoderViT``): encoder on the
    visible tokens + cls -> Linear to ``decoder_dim`` -> mask tokens at hidden positions -> sin-cos positions ->
    ``decoder_depth`` Transformer blocks -> LayerNorm -> Linear to p*p*C; norm-pix MSE on masked patches.

    Init as the official ``initialize_weights`` (``mae_init=True``): the encoder is re-initialised too —
    xavier_uniform for every Linear (zero bias) and for the patch conv viewed 2-D, LayerNorm 1 / 0, cls and
    mask tokens normal std .02. Pass ``mae_init=False`` to keep the weights of an ``encoder`` you hand in
    (all but ``pos_embed``, which is always set to the fixed sin-cos table and frozen).
    """

    def __init__(self, encoder: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 mae_init: bool = True):
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise EncoderTypeError(f"MAE needs a maskconv VisionTransformer encoder (vit_*), got {type(encoder).__name__}")
        if not isinstance(encoder.norm, nn.LayerNorm):
            raise ValueError("MAE pretrains the encoder with its final 'norm': build it with global_pool='token' "
                             "(the default); fine-tune later with global_pool='avg' as MAE does")
        check_objective_args(mask_ratio, decoder_dim, decoder_depth, decoder_heads)
        if encoder.embed_dim % 4:
            raise ValueError(f"encoder width {encoder.embed_dim} must be divisible by 4 (2-D sin-cos position table)")
        self.encoder = encoder
        encoder.reset_classifier(0)  # the classifier is not used in pretraining
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.config = dict(mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                           decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss)  # saved with the weights
        self.patch_size, self.in_chans = encoder.patch_size, encoder.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        with torch.no_grad():  # fixed sin-cos table (zero cls row), frozen: DDP must not wait for its gradient
            encoder.pos_embed.copy_(sincos_pos_embed_2d(encoder.embed_dim, encoder.pos_grid, cls_token=True)[None])
        encoder.pos_embed.requires_grad_(False)
        if mae_init:
            w = encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear, not a conv (official)
            nn.init.normal_(encoder.cls_token, std=0.02)
            encoder.blocks.apply(init_mae)
            encoder.norm.apply(init_mae)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_mae)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor, drawn: bool = False) -> torch.Tensor:
        """(B, C_in, H, W), mask (B, h, w) -> normed tokens (B, 1 + L_vis, D): cls, then the visible patches in
        position order (the official code keeps them in shuffled order; attention does not care)."""
        enc = self.encoder
        enc.check_input(images)
        keep = self.visible_count(images, mask, drawn)  # drawn: not read back (no sync)
        mask = mask.to(images.device)
        # the encoder's own (frozen sin-cos) position table, resampled for a grid other than its stored one exactly
        # as fine-tuning / linear probing will see it; an fp32 parameter, so the residual stream stays fp32
        x, _ = enc.patchify_tokens(images)  # (B, L, D) with positions
        b, _, d = x.shape
        ids = visible_positions(mask, keep)  # (B, L_vis) ascending: a static-size gather, no boolean indexing
        x = x.gather(1, ids.unsqueeze(-1).expand(-1, -1, d))  # (B, L_vis, D)
        cls = enc.cls_with_pos().expand(b, -1, -1)  # the cls row of the table is zero, as official
        x = enc.run_blocks(torch.cat([cls, x], dim=1))  # grad checkpointing follows the encoder's setting
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L_vis, D) -> predictions (B, L, p*p*C_in) for every patch (the cls output is dropped)."""
        b, h, w = mask.shape
        x = self.decoder_embed(latent).to(self.mask_token.dtype)  # (B, 1 + L_vis, Dd); fp32 stream under autocast
        d = x.shape[-1]
        full = self.mask_token.expand(b, h * w, d)
        ids = visible_positions(mask, x.shape[1] - 1)  # (B, L_vis): the positions the encoder gathered
        # scatter visible tokens back to their positions: row-major order, as they were gathered
        full = full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1)  # (B, 1 + L, Dd)
        x = x + sincos_pos_embed_2d(d, (h, w), cls_token=True, dtype=x.dtype, device=x.device)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# ---- checkpoint layouts -----------------------------------------------------------------------------------
@register_checkpoint_filter(MAE)
def checkpoint_filter_fn(state_dict: dict, model: MAE) -> tuple[dict, str]:
    """Read a whole official ``MaskedAutoencoderViT`` state (encoder + decoder, ``models_mae.py`` names) into
    the objective: encoder keys gain ``encoder.`` (pos_embed resampled to the encoder's table if needed), the
    fixed ``decoder_pos_embed`` is dropped (computed per grid). HF transformers ``ViTMAEForPreTraining`` keys are
    renamed to the official ones first (``models/vit_layouts.py``). Our own layout passes through."""
    from ..models.vit import checkpoint_filter_fn as backbone_filter
    from ..models.vit_layouts import hf_vit_to_mae, is_hf_vit

    hf = is_hf_vit(state_dict)  # before the native check: HF's ViTMAEModel keys start with 'encoder.layer.'
    if hf:
        state_dict = hf_vit_to_mae(state_dict)
    elif any(k.startswith("encoder.") for k in state_dict):
        return dict(state_dict), "native"
    if "decoder_pos_embed" in state_dict:
        _check_fixed_table(state_dict["decoder_pos_embed"])
    sd = split_official_state(state_dict, model, backbone_filter, "MAE")
    return sd, "hf-mae-pretrain" if hf else "mae-pretrain"


def _check_fixed_table(table: torch.Tensor) -> None:
    """The objective drops a checkpoint's ``decoder_pos_embed`` and computes MAE's fixed sin-cos table per grid:
    right only when the stored table is that table (a model saved before its tables were initialised, e.g. an HF
    transformers 5 ``ViTMAEForPreTraining`` built from a config, stores zeros), so anything else is refused."""
    ok = table.ndim == 3 and table.shape[0] == 1 and table.shape[1] > 1 and table.shape[2] % 4 == 0
    if ok:
        n, d = table.shape[1] - 1, table.shape[2]
        side = math.isqrt(n)
        ok = side * side == n and torch.allclose(table[0].float(), sincos_pos_embed_2d(d, side, cls_token=True),
                                                 atol=1e-5)
    if not ok:
        raise ValueError(f"checkpoint decoder_pos_embed {tuple(table.shape)} is not MAE's fixed 2-D sin-cos table, "
                         "which the objective computes instead of reading: refusing to drop it")
