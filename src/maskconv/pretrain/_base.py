"""What every masked-image objective (FCMAE, MAE, ConvMAE) shares: the patch grid, the mask, pixel targets, the
loss on masked patches and the forward. A subclass sets ``patch_size``, ``in_chans``, ``mask_ratio``,
``norm_pix_loss``, ``encoder`` and defines ``forward_encoder(images, mask)`` / ``forward_decoder(latent, mask)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..config import SparsePath, literal_words, one_of
from .masking import check_mask, check_mask_ratio, num_visible, random_mask
from .targets import patch_stats, patchify


class EncoderTypeError(TypeError, ValueError):
    """The encoder is not of the family the objective needs (also a ValueError: the CLI reports it in one line)."""


SPARSE_PATHS = literal_words(SparsePath)  # FCMAE / ConvMAE compute paths of the same masked semantics


def check_objective_args(mask_ratio: float, decoder_dim: int, decoder_depth: int, decoder_heads: int | None = None,
                         sparse: str | None = None) -> None:
    """The objectives' shared argument checks, one ValueError naming the problem. ``decoder_heads``: a Transformer
    decoder with a 2-D sin-cos table (MAE, ConvMAE); ``sparse``: the compute path (FCMAE, ConvMAE)."""
    check_mask_ratio(mask_ratio)
    if sparse is not None and sparse not in SPARSE_PATHS:
        raise ValueError(f"sparse must be {one_of(repr(w) for w in SPARSE_PATHS)}, got {sparse!r}")
    if decoder_depth < 0 or decoder_dim < 1:
        raise ValueError(f"decoder_depth ({decoder_depth}) must be >= 0 and decoder_dim ({decoder_dim}) >= 1")
    if decoder_heads is not None:
        if decoder_heads < 1:
            raise ValueError(f"decoder_heads ({decoder_heads}) must be >= 1")
        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by decoder_heads {decoder_heads} and by 4 "
                             "(2-D sin-cos position table)")


@dataclass
class MaskedOutput:
    loss: torch.Tensor  # scalar, mean over masked patches only
    pred: torch.Tensor  # (B, L, p*p*C), normalised-pixel space when norm_pix_loss
    mask: torch.Tensor  # (B, h, w) bool, True = masked


class MaskedImageObjective(nn.Module):
    patch_size: int
    in_chans: int
    mask_ratio: float
    norm_pix_loss: bool
    encoder: nn.Module

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (h, w) of ``images`` (B, C, H, W); a clear error if the sizes do not divide."""
        p = self.patch_size
        h, w = images.shape[-2:]
        if images.ndim != 4 or h % p or w % p:
            raise ValueError(f"images must be (B, {self.in_chans}, H, W) with H and W multiples of the patch size "
                             f"{p} (the encoder's total stride); got {tuple(images.shape)}")
        return h // p, w // p

    def visible_count(self, images: torch.Tensor, mask: torch.Tensor, drawn: bool = False) -> int:
        """Check ``mask`` against the patch grid of ``images``; the visible patches per sample. Eager: read from
        the mask (validated); under ``torch.compile``, or for a mask ``drawn`` by ``make_mask`` / ``indexed_masks``
        at this objective's ratio: the objective's own count for ``mask_ratio`` (what those masks always keep),
        with only the shape checked, so the step has static shapes and no host sync."""
        h, w = self.grid(images)
        return check_mask(mask, images.shape[0], h, w, keep=num_visible(h * w, self.mask_ratio), read=not drawn)

    def make_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random (B, h, w) bool mask, True = masked, the same number hidden in every sample."""
        h, w = self.grid(images)
        return random_mask(images.shape[0], h, w, self.mask_ratio, images.device, generator)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel targets (B, L, p*p*C), per-patch normalised when ``norm_pix_loss`` (unbiased var + 1e-6)."""
        t = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, std = patch_stats(t)
            t = (t - mean) / std
        return t

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = (pred.float() - self.target(images)).pow(2).mean(dim=-1)  # (B, L)
        m = mask.flatten(1).to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp_min(1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, *, drawn: bool = False) -> MaskedOutput:
        """``mask`` None: drawn here; given: the forward is deterministic (the mask is made outside the model).
        ``drawn``: the caller's mask comes from ``make_mask`` / ``indexed_masks`` at this objective's
        ``mask_ratio`` (the engine's masks), so its values are not read back to be validated: on a GPU that read is
        a device->host sync per micro-batch."""
        if mask is None:
            mask, drawn = self.make_mask(images), True
        latent = self.forward_encoder(images, mask.to(images.device), drawn=drawn)
        pred = self.forward_decoder(latent, mask)
        return MaskedOutput(loss=self.forward_loss(images, pred, mask), pred=pred, mask=mask)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with the backbone's keys: load strict into ``create_model(name, num_classes=0)``
        (and timm's same-named model where timm has it)."""
        return self.encoder.state_dict()

    def no_weight_decay(self) -> set[str]:
        """The mask token and the encoder's own no-decay set (MAE: cls token, pos table; the official MAE
        pretraining decays the tokens, the project rule does not)."""
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def split_official_state(state_dict: dict, model: MaskedImageObjective, backbone_filter: Callable,
                         what: str) -> dict:
    """An official whole pretraining state (encoder keys bare, decoder keys ``decoder_*`` / ``mask_token``) in
    our objective layout: encoder keys through the backbone's ``checkpoint_filter_fn`` and prefixed ``encoder.``,
    the objective's own keys as they are, the fixed ``decoder_pos_embed`` dropped (computed per grid)."""
    if not any(k.startswith("decoder_") for k in state_dict):
        from ..models import BackboneOnlyCheckpointError

        raise BackboneOnlyCheckpointError(f"not a whole {what} pretraining state (no 'decoder_*' keys); a backbone-only "
                                          "checkpoint loads into the encoder: load_checkpoint(objective.encoder, path)")
    own = {k for k in model.state_dict() if not k.startswith("encoder.")}
    enc = {k: v for k, v in state_dict.items() if k not in own and k != "decoder_pos_embed"}
    enc, _ = backbone_filter(enc, model.encoder)  # e.g. resamples pos_embed to the encoder's table
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    sd.update({k: v for k, v in state_dict.items() if k in own})
    return sd
