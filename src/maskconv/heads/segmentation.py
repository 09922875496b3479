"""UperNet semantic segmentation on any maskconv backbone, and its metric (mIoU, per-class IoU).

UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) as the ConvNeXt and ConvMAE
ADE20K protocol runs it (open-mmlab/mmsegmentation ``decode_heads/uper_head.py``, used by
facebookresearch/ConvNeXt semantic_segmentation): a pyramid pooling module (PPM, pool scales 1, 2, 3, 6) on the
last level, 1x1 laterals + a top-down FPN with 3x3 convs on the others, all levels upsampled to the finest and
fused by a 3x3 conv, dropout, a 1x1 classifier; conv -> BN -> ReLU throughout (mmseg's ConvModule). The logits are
upsampled to the input. Our own compact head (docs/DECISIONS.md): segmentation_models_pytorch's encoders are its
own registry of classes, not a model handed to it.

Any input size: the image is padded bottom/right to a multiple of the backbone's largest stride and the logits
are cropped back, so the output is (B, K, H, W) for every H, W (non-square included).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .detection import LayerDecayFromBackbone

__all__ = ["UperHead", "UperNet", "build_segmenter", "SegmentationMetric"]


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UperHead(nn.Module):
    """PPM + FPN fusion over maps (B, C_i, H/r_i, W/r_i), finest first -> logits (B, K, H/r_0, W/r_0)."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(in_channels[-1], channels, 1))
                                  for s in pool_scales])
        self.bottleneck = _cbr(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_cbr(c, channels, 1) for c in in_channels[:-1]])
        self.fpn = nn.ModuleList([_cbr(channels, channels, 3) for _ in in_channels[:-1]])
        self.fuse = _cbr(len(in_channels) * channels, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        top = self.bottleneck(torch.cat([top] + [self._up(p(top), top) for p in self.ppm], 1))  # (B, D, h, w)
        lat = [lateral(m) for lateral, m in zip(self.lateral, maps[:-1])] + [top]
        for i in range(len(lat) - 1, 0, -1):  # top-down: each level + the coarser one upsampled
            lat[i - 1] = lat[i - 1] + self._up(lat[i], lat[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        fused = self.fuse(torch.cat([outs[0]] + [self._up(o, outs[0]) for o in outs[1:]], 1))  # (B, D, H/r0, W/r0)
        return self.classifier(self.drop(fused))


class UperNet(LayerDecayFromBackbone, nn.Module):
    """``backbone`` (a ``FeatureNet``) + ``UperHead``: (B, C, H, W) normalised images -> (B, K, H, W) logits."""

    BODY = "backbone."

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = UperHead(backbone.feature_info.channels(), num_classes, channels, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K, H, W)
        h, w = x.shape[-2:]
        s = self.backbone.stride
        ph, pw = -h % s, -w % s
        xp = F.pad(x, (0, pw, 0, ph)) if ph or pw else x  # bottom / right, cropped off below
        logits = self.head(self.backbone(xp))
        logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def build_segmenter(backbone: str, num_classes: int, img_size: int = 512, in_chans: int = 3, channels: int = 512,
                    pretrained: str | None = None, **backbone_kwargs) -> UperNet:
    """UperNet for ``num_classes`` classes (pixel label 0..K-1; ``data.coco.IGNORE_INDEX`` ignored) on maskconv
    backbone ``backbone`` (its dense face, ``heads.detection.dense_backbone``)."""
    from .detection import dense_backbone

    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: segmentation needs at least 2 classes (background + one)")
    return UperNet(dense_backbone(backbone, img_size, in_chans, pretrained, **backbone_kwargs), num_classes, channels)


class SegmentationMetric:
    """Confusion matrix over pixels (``IGNORE_INDEX`` left out) -> per-class IoU and mIoU (mmseg's: the mean over
    classes present in the ground truth or the predictions; a class in neither has no IoU)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.k, self.ignore = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # [true, predicted]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: (..., H, W) class indices of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        keep = target != self.ignore
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        if t.numel() and (int(t.max()) >= self.k or int(t.min()) < 0):
            raise ValueError(f"label values {int(t.min())}..{int(t.max())} outside 0..{self.k - 1} "
                             f"(and {self.ignore} = ignore)")
        self.confusion += torch.bincount(t * self.k + p, minlength=self.k * self.k).reshape(self.k, self.k)

    def compute(self) -> dict:
        c = self.confusion.double()
        if c.sum() == 0:
            raise ValueError("no labelled pixels were scored: an mIoU of nothing is not a number to report")
        inter = c.diag()
        union = c.sum(0) + c.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        return {"mIoU": float(iou[~iou.isnan()].mean()), "pixel_acc": float(inter.sum() / c.sum()),
                "per_class_IoU": [None if v != v else float(v) for v in iou.tolist()]}
