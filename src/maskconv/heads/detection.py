"""Mask R-CNN / Faster R-CNN (torchvision's) over an FPN on any maskconv backbone's dense face.

The detector is torchvision's (``torchvision.models.detection.MaskRCNN`` / ``FasterRCNN``: RPN, ROI heads, mask
head, losses, post-processing); maskconv adds only the body: ``create_model(name, features_only=True)``
(``models/dense.py``: per-stage maps, with the per-output LayerNorm of the official ConvNeXt detection backbone,
or ViTDet's simple feature pyramid for a ViT) under ``torchvision.ops.FeaturePyramidNetwork`` with a max-pooled
extra level. Anchors are one size per level, ``anchor_size * 2**level`` (torchvision's default 32..512 for
``anchor_size=32``; smaller images take smaller anchors), three aspect ratios.

Layer-wise lr decay as the official detection recipes use it (facebookresearch/ConvNeXt object_detection
``LearningRateDecayOptimizerConstructor``, ViTDet's ``get_vit_lr_decay_rate``): the backbone's own layer ids
(``layer_id`` / ``num_lr_layers`` of the family, any ``scheme`` it has), every new layer (per-output norms,
pyramid, FPN, RPN, ROI heads) at the top id, so ``engine/optim.param_groups`` applies it unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

__all__ = ["BackboneWithFPN", "LayerDecayFromBackbone", "build_detector", "dense_backbone"]


class BackboneWithFPN(nn.Module):
    """``FeatureNet`` maps -> FPN levels ``'0'..'n-1'`` + ``'pool'`` (``out_channels`` each), what torchvision's
    detectors read."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.names = [str(i) for i in range(len(body.feature_info))]

    def forward(self, x: torch.Tensor) -> OrderedDict:  # (B, C, H, W) -> {'0': (B, D, H/r0, W/r0), ..., 'pool'}
        return self.fpn(OrderedDict(zip(self.names, self.body(x))))


class LayerDecayFromBackbone:
    """Mixin for a model holding a ``FeatureNet`` at ``self.BODY``: the layer ids (layer-wise lr decay) and the
    no-weight-decay names of the backbone, everything else at the top id (``engine/optim.param_groups``)."""

    BODY = "backbone.body."

    def _body(self) -> nn.Module:
        return self.get_submodule(self.BODY.rstrip("."))

    def num_lr_layers(self, scheme: str = "single") -> int:
        return self._body().num_lr_layers(scheme)

    def layer_id(self, name: str, scheme: str = "single") -> int:
        if name.startswith(self.BODY):
            return self._body().layer_id(name[len(self.BODY):], scheme)
        return self.num_lr_layers(scheme)

    def no_weight_decay(self) -> set[str]:
        return {self.BODY + n for n in self._body().no_weight_decay()}


def _detector_classes():
    from torchvision.models.detection import FasterRCNN, MaskRCNN

    class MaskConvMaskRCNN(LayerDecayFromBackbone, MaskRCNN):
        """torchvision's Mask R-CNN with a maskconv body (layer ids from the backbone)."""

    class MaskConvFasterRCNN(LayerDecayFromBackbone, FasterRCNN):
        """torchvision's Faster R-CNN with a maskconv body (layer ids from the backbone)."""

    return MaskConvMaskRCNN, MaskConvFasterRCNN


def dense_backbone(name: str, img_size: int, in_chans: int = 3, pretrained: str | None = None, **kwargs) -> nn.Module:
    """The dense face the heads read: ``create_model(name, features_only=True)`` with the per-output LayerNorm
    (the official ConvNeXt detection / segmentation backbones'), ViTDet's pyramid for a ViT (its own norms);
    a ViT / ConvMAE stores its position table for ``img_size`` (as ``pix2seq.task.build_pix2seq``).
    ``pretrained``: backbone weights in any layout ``load_checkpoint`` reads, loaded strict."""
    from ..models import create_model
    from ..models.convmae import ConvViT
    from ..models.vit import VisionTransformer

    with torch.device("meta"):  # the class only
        shape = create_model(name, num_classes=0)
    if isinstance(shape, (VisionTransformer, ConvViT)):
        kwargs.setdefault("img_size", img_size)
    body = create_model(name, features_only=True, out_norm=not isinstance(shape, VisionTransformer),
                        in_chans=in_chans, **kwargs)
    if pretrained:
        rep = body.load_backbone(pretrained)
        print(f"backbone weights from {pretrained} ({rep.layout} layout)")
    return body


def build_detector(backbone: str, num_classes: int, masks: bool = True, img_size: int = 800, in_chans: int = 3,
                   anchor_size: int = 32, fpn_dim: int = 256, pretrained: str | None = None,
                   detections_per_image: int = 100, head_dim: int = 256, proposals: int = 2000,
                   roi_samples: int = 512, **backbone_kwargs) -> nn.Module:
    """Mask R-CNN (``masks``) or Faster R-CNN for ``num_classes`` object classes (labels 1..K; 0 = background)
    on maskconv backbone ``backbone`` (weights from ``pretrained``: any layout ``load_checkpoint`` reads).
    Images are resized so their shorter side is ``img_size`` (longer side at most ``img_size``) and normalised
    as maskconv's backbones expect (``data.photos.default_norm``).

    Sizes of torchvision's parts, at torchvision's defaults: ``head_dim`` (mask head convs; the box head's MLP is
    4x), ``proposals`` (RPN boxes kept after NMS in training; half at test), ``roi_samples`` (ROIs sampled per
    image for the box loss). Small images with few objects train as well and far faster with smaller ones."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    from ..data.photos import default_norm

    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: a detector needs at least one object class")
    body = dense_backbone(backbone, img_size, in_chans, pretrained, **backbone_kwargs)
    fpn = BackboneWithFPN(body, fpn_dim)
    levels = len(fpn.names) + 1  # + the max-pooled level
    anchors = AnchorGenerator(tuple((anchor_size * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    mean, std = default_norm(in_chans)
    mask_rcnn, faster_rcnn = _detector_classes()
    k = num_classes + 1  # + background
    common = dict(num_classes=None, min_size=img_size, max_size=img_size, image_mean=list(mean),
                  image_std=list(std), rpn_anchor_generator=anchors, box_detections_per_img=detections_per_image,
                  box_roi_pool=MultiScaleRoIAlign(fpn.names, 7, 2), box_head=TwoMLPHead(fpn_dim * 49, 4 * head_dim),
                  box_predictor=FastRCNNPredictor(4 * head_dim, k), rpn_pre_nms_top_n_train=proposals,
                  rpn_post_nms_top_n_train=proposals,
                  rpn_pre_nms_top_n_test=max(1, proposals // 2), rpn_post_nms_top_n_test=max(1, proposals // 2),
                  box_batch_size_per_image=roi_samples)
    if masks:
        model = mask_rcnn(fpn, mask_roi_pool=MultiScaleRoIAlign(fpn.names, 14, 2),
                          mask_head=MaskRCNNHeads(fpn_dim, (head_dim,) * 4, 1),
                          mask_predictor=MaskRCNNPredictor(head_dim, head_dim, k), **common)
    else:
        model = faster_rcnn(fpn, **common)
    model.transform.size_divisible = max(32, body.stride)  # batched images padded to a size every level divides
    return model
