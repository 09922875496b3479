"""FCMAE: ConvNeXt V2's fully convolutional masked autoencoder, in pure PyTorch.

Paper: Woo et al., "ConvNeXt V2" (arXiv:2301.00808), §3; official code facebookresearch/ConvNeXt-V2
(``models/fcmae.py``, MinkowskiEngine encoder ``models/convnextv2_sparse.py``).

The encoder is a plain ``ConvNeXt`` from ``maskconv.models`` (same weights, same keys); this module runs it
under a mask with one of two implementations of the same (submanifold sparse conv) semantics:

* ``sparse="dense"`` — the reference, as the JAX recipe the released models were trained with: dense compute,
  masked positions zeroed after the stem, after every spatial op and at every block output; GRN statistics
  over visible positions only, per sample.
* ``sparse="gather"`` (default) — pointwise work (LayerNorm, MLP, GRN, residual: most of the FLOPs) runs only
  on the visible positions, gathered as (N_vis, C); the spatial ops (depthwise k×k, 2×2 downsample) see a
  map whose masked positions are zero, so visible outputs equal the sparse convolution's.

The mask never lives in module state: it is an argument of each call. Masks align with the total stride, so
a 2×2/s2 downsample never mixes visible and masked cells and the paths agree exactly (up to float order).
"""
from __future__ import annotations

import warnings


import torch
import torch.nn as nn

from ..layers import init_trunc_normal
from ..models import BackboneOnlyCheckpointError, register_checkpoint_filter
from ..models.convnext import ConvNeXt, ConvNeXtBlock
from ._base import EncoderTypeError, MaskedImageObjective, MaskedOutput, check_objective_args
from ._tokens import gather_tokens, scatter_tokens
from .masking import check_mask, upsample_mask, visible_index


FCMAEOutput = MaskedOutput  # loss, pred (B, L, p*p*C), mask (B, h, w) bool


# Both paths compose the block's own sub-steps (``ConvNeXtBlock.spatial`` / ``channel`` / ``residual``), the ones
# its dense forward runs: only the masking and the token layout are written here.

# ---- dense-masked reference path ---------------------------------------------------------------------------
def block_dense(blk: ConvNeXtBlock, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) zero at masked cells; ``hidden`` (B, 1, H, W) bool. GRN statistics over visible cells
    (the hidden cells are zeroed before it), the branch re-zeroed at masked cells before the residual."""
    y = blk.spatial(x).masked_fill(hidden, 0).permute(0, 2, 3, 1)  # (B, H, W, C)
    y = blk.channel(y, hidden.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).masked_fill(hidden, 0)  # (B, C, H, W)
    return blk.residual(x, y)


def encode_dense(enc: ConvNeXt, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference masked encoder: (B, C_in, H, W), mask (B, h, w) -> (B, C, h, w), zero at masked cells."""
    scale = 2 ** (len(enc.stages) - 1)
    hidden = upsample_mask(mask, scale).unsqueeze(1)  # (B, 1, H0, W0)
    y = enc.stem(x.contiguous(memory_format=torch.channels_last)).masked_fill(hidden, 0)
    for i, stage in enumerate(enc.stages):
        if i > 0:
            ln, conv = stage.downsample
            y = conv(ln(y).masked_fill(hidden, 0))  # LN(0) = bias: re-zero before the spatial op
            scale //= 2
            hidden = upsample_mask(mask, scale).unsqueeze(1)
            y = y.masked_fill(hidden, 0)
        for blk in stage.blocks:
            y = block_dense(blk, y, hidden)
    return y


# ---- gathered sparse path ----------------------------------------------------------------------------------
def block_gather(blk: ConvNeXtBlock, t: torch.Tensor, idx: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """``t`` (N_vis, C) visible tokens, sample-major. Only the depthwise conv sees the full map."""
    n, c = t.shape
    y = blk.spatial(scatter_tokens(t, idx, b, h, w))  # (B, C, H, W)
    # (B, L, 1, C): per-sample view so GRN pools over this sample's visible cells (dims 1, 2)
    y = blk.channel(gather_tokens(y.permute(0, 2, 3, 1), idx).view(b, n // b, 1, c))
    return blk.residual(t.view(b, n // b, 1, c), y).view(n, c)


def encode_gather(enc: ConvNeXt, x: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Sparse masked encoder: same result as ``encode_dense``; pointwise work on visible cells only. ``keep``:
    visible patches per sample (default: read from the mask, a host sync; every stage's index is then a
    static-size sort of the upsampled mask)."""
    b = x.shape[0]
    keep = check_mask(mask, *mask.shape) if keep is None else keep
    scale = 2 ** (len(enc.stages) - 1)
    y = enc.stem[0](x.contiguous(memory_format=torch.channels_last))  # patchify conv: no overlap, no leak
    h, w = y.shape[-2:]
    idx = visible_index(upsample_mask(mask, scale), keep * scale * scale)
    t = enc.stem[1].forward_last(gather_tokens(y.permute(0, 2, 3, 1), idx))  # (N_vis, C0)
    for i, stage in enumerate(enc.stages):
        if i > 0:
            ln, conv = stage.downsample
            y = conv(scatter_tokens(ln.forward_last(t), idx, b, h, w))
            h, w = y.shape[-2:]
            scale //= 2
            idx = visible_index(upsample_mask(mask, scale), keep * scale * scale)
            t = gather_tokens(y.permute(0, 2, 3, 1), idx)
        for blk in stage.blocks:
            t = block_gather(blk, t, idx, b, h, w)
    return scatter_tokens(t, idx, b, h, w)


# ---- objective ---------------------------------------------------------------------------------------------
class FCMAE(MaskedImageObjective):
    """Masked autoencoder around a ConvNeXt encoder: sparse encoder -> 1x1 proj -> mask tokens -> ConvNeXt V2
    decoder block(s) -> 1x1 pixel head; loss on masked patches only.

    Init: trunc_normal std .02 everywhere (the official FCMAE re-inits convs/linears with std 1.0, which looks
    unintended: the released weights came from JAX training); mask token normal std .02.
    """

    def __init__(self, encoder: ConvNeXt, mask_ratio: float = 0.6, decoder_dim: int = 512, decoder_depth: int = 1,
                 norm_pix_loss: bool = True, sparse: str = "gather"):
        super().__init__()
        if not isinstance(encoder, ConvNeXt):
            raise EncoderTypeError(f"FCMAE needs a maskconv ConvNeXt encoder, got {type(encoder).__name__}")
        check_objective_args(mask_ratio, decoder_dim, decoder_depth, sparse=sparse)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
            # e.g. SLaK's conv-BN branches: no leak (BN is per channel), but not submanifold-sparse semantics
            warnings.warn(f"{type(encoder).__name__} has BatchNorm layers: under FCMAE their training-mode batch "
                          "statistics include the zeroed masked positions (LayerNorm/GRN use visible ones only)",
                          stacklevel=2)
        self.encoder = encoder
        # The classifier head is not used in pretraining; freezing it keeps DDP from waiting for its gradients.
        encoder.reset_classifier(0)
        encoder.head.requires_grad_(False)
        self.mask_ratio, self.norm_pix_loss, self.sparse = mask_ratio, norm_pix_loss, sparse
        self.config = dict(mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                           norm_pix_loss=norm_pix_loss, sparse=sparse)  # saved with the weights
        self.patch_size, self.in_chans = encoder.stride, encoder.in_chans
        self.proj = nn.Conv2d(encoder.num_features, decoder_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[ConvNeXtBlock(decoder_dim, ls_init_value=None, use_grn=True)
                                       for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, self.patch_size**2 * self.in_chans, 1)
        for m in (self.proj, self.decoder, self.pred):
            m.apply(init_trunc_normal)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor, drawn: bool = False) -> torch.Tensor:
        """(B, C_in, H, W), mask (B, h, w) -> encoder map (B, C, h, w), exactly zero at masked positions."""
        self.encoder.check_input(images)
        keep = self.visible_count(images, mask, drawn)  # drawn: not read back (no sync)
        mask = mask.to(images.device)
        if self.sparse == "gather":
            return encode_gather(self.encoder, images, mask, keep)
        return encode_dense(self.encoder, images, mask)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> predictions (B, L, p*p*C_in)."""
        x = self.proj(z)
        x = torch.where(mask.unsqueeze(1), self.mask_token.to(x.dtype), x)
        x = self.decoder(x.contiguous(memory_format=torch.channels_last))
        return self.pred(x).flatten(2).transpose(1, 2)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {
            n for n, _ in self.named_parameters() if n.startswith("decoder.") and ".grn." in n}


# ---- checkpoint layouts -----------------------------------------------------------------------------------
@register_checkpoint_filter(FCMAE)
def checkpoint_filter_fn(state_dict: dict, model: FCMAE) -> tuple[dict, str]:
    """Read a whole official FCMAE state (facebookresearch/ConvNeXt-V2 ``models/fcmae.py``: ``encoder.*`` in the
    MinkowskiEngine or dense layout, ``proj``, ``mask_token``, ``decoder.i.*`` dense ConvNeXt V2 blocks, ``pred``)
    into the objective to continue pretraining. The encoder goes through the ConvNeXt filter; the decoder keys map
    one-to-one (block names as timm's, GRN (1, 1, 1, C) -> (C,), the official dense block's known forms); the
    encoder's ``head.norm``, unused in pretraining and absent there, keeps the model's values. Our own layout
    (``encoder.stem.*``) passes through; a backbone-only state is refused with a hint."""
    from ..models.convnext_layouts import checkpoint_filter_fn as backbone_filter, fb_block_key, known_reshapes

    if any(k.startswith("encoder.stem.") for k in state_dict):
        return dict(state_dict), "native"
    if not any(k.startswith("encoder.downsample_layers.") for k in state_dict) or "mask_token" not in state_dict:
        raise BackboneOnlyCheckpointError("not a whole FCMAE pretraining state ('encoder.downsample_layers.*' + 'mask_token' / "
                         "'decoder.*'); a backbone-only checkpoint loads into the encoder: "
                         "load_checkpoint(objective.encoder, path)")
    enc, layout = backbone_filter({k: v for k, v in state_dict.items() if k.startswith("encoder.")}, model.encoder)
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    for k, v in model.encoder.head.state_dict().items():  # the official encoder has no head / final norm
        sd.setdefault(f"encoder.head.{k}", v.clone())
    dec = {fb_block_key(k): v for k, v in state_dict.items() if not k.startswith("encoder.")}
    sd.update(known_reshapes(dec, model.state_dict(), "fb"))  # the decoder is dense in every official FCMAE
    return sd, f"official-{layout}"
