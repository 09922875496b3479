"""Masked-reconstruction pictures: original | masked input | prediction | prediction pasted on visible patches."""
from __future__ import annotations

from pathlib import Path

import torch

from ..pretrain.masking import upsample_mask
from ..pretrain.targets import patch_stats, patchify, unpatchify
from ._plot import pyplot, save


@torch.no_grad()
def reconstruct(obj, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run a masked-image objective and return image-space tensors (B, C, H, W), in the input's normalisation:
    ``original``, ``masked`` (hidden patches zeroed), ``pred`` (every patch predicted), ``pasted`` (prediction
    on hidden patches, original on visible ones). Norm-pix predictions are mapped back to pixels with each
    target patch's own mean and std (as the MAE demo)."""
    obj.eval()
    out = obj(images, mask)
    p, c = obj.patch_size, images.shape[1]
    h, w = out.mask.shape[-2:]
    pred = out.pred.float()
    if obj.norm_pix_loss:
        mean, std = patch_stats(patchify(images.float(), p))
        pred = pred * std + mean
    pred_img = unpatchify(pred, p, h, w, c)
    hidden = upsample_mask(out.mask, p).unsqueeze(1)  # (B, 1, H, W)
    return dict(original=images, masked=images.masked_fill(hidden, 0), pred=pred_img,
                pasted=torch.where(hidden, pred_img, images), mask=out.mask, loss=out.loss)


def plot_reconstruction(obj, images: torch.Tensor, path: str | Path, mean=None, std=None,
                        mask: torch.Tensor | None = None, title: str | None = None) -> Path:
    """Write a PNG with one row per image: original | masked | prediction | prediction + visible."""
    plt = pyplot()
    r = reconstruct(obj, images, mask)
    c = images.shape[1]
    m = torch.tensor(mean if mean is not None else [0.0] * c).view(1, c, 1, 1)
    s = torch.tensor(std if std is not None else [1.0] * c).view(1, c, 1, 1)

    def show(t):  # (B, C, H, W) normalised -> (B, H, W, C) in [0, 1]
        t = (t.float().cpu() * s + m).clamp(0, 1)
        return t.permute(0, 2, 3, 1).numpy()

    cols = ["original", "masked", "pred", "pasted"]
    names = ["original", f"masked ({obj.mask_ratio:.0%})", "prediction", "prediction + visible"]
    imgs = {k: show(r[k]) for k in cols}
    b = images.shape[0]
    fig, axes = plt.subplots(b, 4, figsize=(4 * 2.4, b * 2.4), squeeze=False)
    for i in range(b):
        for j, k in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(imgs[k][i].squeeze(-1) if c == 1 else imgs[k][i], cmap="gray" if c == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=9)
    fig.suptitle(title or f"masked reconstruction, loss {r['loss'].item():.3f}", fontsize=10)
    return save(fig, path, dpi=100, top=1 - 0.35 / (2.4 * b))
