"""The Pix2Seq token vocabulary, laid out as the official code's ``vocab.py`` (google-research/pix2seq).

| tokens                         | meaning                                                       |
|--------------------------------|---------------------------------------------------------------|
| 0                              | padding, also the end token                                   |
| 10 11 12 13 16                 | task prompts: detection, instance seg., keypoints, captioning, panoptic |
| 30                             | fake class (noise boxes) / fake text token                    |
| 40, 41                         | separator (between polygon parts), invisible point            |
| [100, coord_shift)             | classes: label + 100, labels 1-based (0 = padding)            |
| [coord_shift, coord_shift+bins)| quantized coordinates                                         |
| >= text_shift                  | text (captioning; v2)                                         |

Quantization is the official ``utils.quantize``: ``q = clip(round(v * (bins - 1)), 0, bins - 1)`` of a coordinate
``v`` in [0, 1] (normalized by the padded image size), ``dequantize(q) = q / (bins - 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PADDING_TOKEN = 0
EOS_TOKEN = 0  # the official code ends sequences with padding
TASK_TOKENS = {"detection": 10, "instance_segmentation": 11, "keypoints": 12, "captioning": 13, "panoptic": 16}
FAKE_CLASS_TOKEN = 30
FAKE_TEXT_TOKEN = 30
SEPARATOR_TOKEN = 40
INVISIBLE_TOKEN = 41
BASE_VOCAB_SHIFT = 100
FAKE_LABEL = FAKE_CLASS_TOKEN - BASE_VOCAB_SHIFT  # label that maps to the fake class token (-70), as official


def default_bins(img_size: int) -> int:
    """Quantization bins for an input size: about 2 per pixel, at most the official 1000 (at 640 px ~1.5/px).
    At 128 px: 256 bins keep every box of the scenes within IoU 0.93 of its unquantized self."""
    return min(1000, 2 * img_size)


@dataclass(frozen=True)
class Vocab:
    """Token ranges for ``bins`` coordinate bins; ``coord_shift`` 1000 as the official detection config."""
    bins: int = 1000
    coord_shift: int = 1000
    text_size: int = 0  # v2 captioning: a text vocabulary after the coordinates (0 = none)

    def __post_init__(self):
        if self.bins < 2 or self.coord_shift <= BASE_VOCAB_SHIFT:
            raise ValueError(f"need bins >= 2 and coord_shift > {BASE_VOCAB_SHIFT}, got {self.bins}, {self.coord_shift}")

    @property
    def max_classes(self) -> int:
        return self.coord_shift - BASE_VOCAB_SHIFT - 1  # labels 1..max_classes

    @property
    def text_shift(self) -> int:
        return self.coord_shift + self.bins

    @property
    def size(self) -> int:
        return self.text_shift + self.text_size

    def quantize(self, v: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats -> coordinate tokens (round, as official; floor would bias every box up-left)."""
        q = torch.round(v * (self.bins - 1)).clamp(0, self.bins - 1).long()
        return q + self.coord_shift

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinate tokens -> [0, 1] floats (non-coordinate tokens clip to 0 or 1)."""
        return ((tokens - self.coord_shift).float() / (self.bins - 1)).clamp(0, 1)

    def class_token(self, labels: torch.Tensor) -> torch.Tensor:
        return labels + BASE_VOCAB_SHIFT
