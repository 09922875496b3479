"""Objects <-> token sequences for Pix2Seq detection, as the official code builds and reads them.

Sources (google-research/pix2seq): ``data/data_utils.py`` (``reorder_object_instances``, ``augment_bbox``,
``jitter_bbox``, ``shift_bbox``, ``random_bbox``, ``inject_noise_bbox``), ``tasks/object_detection.py``
(``build_response_seq_from_bbox``, ``preprocess_batched``) and ``tasks/task_utils.py``
(``decode_object_seq_to_bbox``). Boxes are ``[ymin, xmin, ymax, xmax]`` in [0, 1] of the padded image;
labels are 1-based (0 = padding). Randomness comes from torch's global RNG, which ``SeededDataset`` seeds per
(seed, epoch, index): a resumed run draws the same noise boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Corruption, literal_words
from .vocab import BASE_VOCAB_SHIFT, FAKE_CLASS_TOKEN, FAKE_LABEL, PADDING_TOKEN, TASK_TOKENS, Vocab

CORRUPTIONS = literal_words(Corruption)  # the config's vocabulary (pix2seq.corruption)


def _truncated_normal(shape, std: float) -> torch.Tensor:
    """TF's truncated normal: N(0, std) redrawn outside 2 std."""
    t = torch.empty(shape)
    return torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std) if t.numel() else t


def _clip(b: torch.Tensor) -> torch.Tensor:
    return b.clamp(0.0, 1.0)  # official truncation_bbox


def _centered(cy, cx, h, w) -> torch.Tensor:
    return _clip(torch.cat([cy - h.abs() / 2, cx - w.abs() / 2, cy + h.abs() / 2, cx + w.abs() / 2], -1))


def noise_boxes(boxes: torch.Tensor, n_noise: int) -> torch.Tensor:
    """``n_noise`` fake boxes for the ``(n, 4)`` real ones (official ``augment_bbox``, ``mix_rate=0``): a random
    number of duplicates (real boxes jittered by truncated-normal noise of std 0.05 x their size), the rest bad
    boxes (a real box moved to a random centre, or a random box of |truncnormal(0, 0.5)| size), shuffled."""
    n = boxes.shape[0]
    dup = 0 if n == 0 else int(torch.randint(0, n_noise + 1, ()))
    bad = n_noise - dup
    tiled = boxes.repeat(1 if n == 0 else n_noise // n + 1, 1)
    tiled = tiled[torch.randperm(len(tiled))]
    src = tiled[:bad]
    hw = src[:, 2:4] - src[:, 0:2]
    shifted = _centered(torch.rand(len(src), 1), torch.rand(len(src), 1), hw[:, :1], hw[:, 1:])
    rand = _centered(torch.rand(bad, 1), torch.rand(bad, 1), _truncated_normal((bad, 1), 0.5),
                     _truncated_normal((bad, 1), 0.5))
    bad_boxes = torch.cat([shifted, rand])
    bad_boxes = bad_boxes[torch.randperm(len(bad_boxes))][:bad]
    tiled = tiled[torch.randperm(len(tiled))]
    src = tiled[:dup]
    size = (src[:, 2:4] - src[:, 0:2]).repeat(1, 2)  # (h, w, h, w)
    dup_boxes = _clip(src + size * _truncated_normal((dup, 4), 0.1 / 2))  # jitter_bbox(max_range=0.1)
    out = torch.cat([bad_boxes, dup_boxes])
    return out[torch.randperm(n_noise)] if n_noise > 0 else out


def build_detection_sequences(boxes: torch.Tensor, labels: torch.Tensor, vocab: Vocab, corruption: str = "none",
                              noise_bbox_weight: float = 1.0, eos_token_weight: float = 0.1,
                              task: str = "detection"):
    """Official ``build_response_seq_from_bbox`` + ``preprocess_batched``. ``boxes`` (B, M, 4) yxyx in [0, 1],
    ``labels`` (B, M) with 0 = padding slot and ``FAKE_LABEL`` = noise box. Returns ``input_seq, target_seq,
    token_weights``, each (B, 5M): the input is the prompt followed by the response with corrupted classes,
    shifted right by one; the target is the response."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"class corruption {corruption!r}: use one of {', '.join(CORRUPTIONS)}")
    B, M = labels.shape
    pad = (labels == 0)[..., None]  # (B, M, 1)
    coords = torch.where(pad, torch.zeros((), dtype=torch.long), vocab.quantize(boxes))  # (B, M, 4)
    cls = torch.where(pad, torch.zeros((), dtype=torch.long), vocab.class_token(labels)[..., None])  # (B, M, 1)
    response = torch.cat([coords, cls], -1).reshape(B, 5 * M)
    rand_cls = BASE_VOCAB_SHIFT + torch.randint(0, vocab.coord_shift - BASE_VOCAB_SHIFT, cls.shape)
    fake_cls = torch.full_like(cls, FAKE_CLASS_TOKEN)
    rand_n_fake = torch.where(torch.rand(cls.shape) > 0.5, rand_cls, fake_cls)
    real_n_fake = torch.where(torch.rand(cls.shape) > 0.5, cls, fake_cls)
    real_n_rand_n_fake = torch.where(torch.rand(cls.shape) > 0.5, cls, rand_n_fake)
    cls_m = {"none": cls, "rand_cls": rand_cls, "real_n_fake_cls": real_n_fake, "rand_n_fake_cls": rand_n_fake,
             "real_n_rand_n_fake_cls": real_n_rand_n_fake}[corruption]
    cls_m = torch.where(pad, torch.zeros((), dtype=torch.long), cls_m)
    response_m = torch.cat([coords, cls_m], -1).reshape(B, 5 * M)
    prompt = torch.full((B, 1), TASK_TOKENS[task], dtype=torch.long)
    input_seq = torch.cat([prompt, response_m], 1)[:, :-1]
    target_seq = response
    return input_seq, target_seq, token_weights(target_seq, noise_bbox_weight, eos_token_weight)


def token_weights(target_seq: torch.Tensor, noise_bbox_weight: float = 1.0, eos_token_weight: float = 0.1):
    """Per-token loss weights of a detection target (B, 5M), as official: real objects 1, noise-box coordinates
    0, noise-box class (target FAKE) ``noise_bbox_weight``, padding/end targets ``eos_token_weight``.
    A pure function of the target, so only the tokens need to travel through the data loader."""
    B, L = target_seq.shape
    cls = target_seq.view(B, L // 5, 5)[..., 4:]  # (B, M, 1)
    is_real = (cls != FAKE_CLASS_TOKEN).float()
    w = torch.cat([is_real.expand(-1, -1, 4), is_real + (1 - is_real) * noise_bbox_weight], -1).reshape(B, L)
    return torch.where(target_seq == PADDING_TOKEN, torch.full_like(w, eos_token_weight), w)


@dataclass
class DetectionTokenizer:
    """One image's objects -> (input_seq, target_seq) for training; logits + tokens -> objects for inference."""
    vocab: Vocab
    max_objects: int = 100
    noise: bool = True  # fill to max_objects with fake boxes (official noise_bbox_weight > 0)
    corruption: str = "rand_n_fake_cls"
    order: str = "random"  # random | none
    noise_bbox_weight: float = 1.0
    eos_token_weight: float = 0.1

    @property
    def seq_len(self) -> int:
        return 5 * self.max_objects

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor, train: bool = True):
        """``boxes`` (N, 4) yxyx in [0, 1], ``labels`` (N,) 1-based -> (input_seq, target_seq), each (5M,).
        Train: random object order, then noise boxes appended, then truncate/pad to ``max_objects``
        (official ``preprocess_train`` order)."""
        boxes, labels = boxes.float().reshape(-1, 4), labels.long().reshape(-1)
        if train and self.order == "random":
            idx = torch.randperm(len(labels))
            boxes, labels = boxes[idx], labels[idx]
        if train and self.noise and len(labels) < self.max_objects:
            extra = self.max_objects - len(labels)
            boxes = torch.cat([boxes, noise_boxes(boxes, extra)])
            labels = torch.cat([labels, torch.full((extra,), FAKE_LABEL, dtype=torch.long)])
        boxes, labels = boxes[:self.max_objects], labels[:self.max_objects]
        M = self.max_objects
        b = torch.zeros(1, M, 4)
        b[0, :len(labels)] = boxes
        lab = torch.zeros(1, M, dtype=torch.long)
        lab[0, :len(labels)] = labels
        inp, tgt, _ = build_detection_sequences(b, lab, self.vocab, self.corruption if train else "none")
        return inp[0], tgt[0]

    def weights(self, target_seq: torch.Tensor) -> torch.Tensor:
        return token_weights(target_seq, self.noise_bbox_weight, self.eos_token_weight)

    def decode(self, logits: torch.Tensor, seq: torch.Tensor):
        """Official ``decode_object_seq_to_bbox``: ``logits`` (B, L, V) and sampled ``seq`` (B, L) ->
        boxes (B, n, 4) yxyx in [0, 1], classes (B, n) 1-based, scores (B, n). The class is the argmax over class
        tokens at every 5th position (not the sampled token); its score is its full-vocabulary probability, so
        mass on the fake class ranks noise slots last."""
        L = seq.shape[1] - seq.shape[1] % 5
        seq, logits = seq[:, :L], logits[:, :L]
        B, n = seq.shape[0], L // 5
        p = logits[:, 4::5].float().softmax(-1)  # (B, n, V)
        band = p[..., BASE_VOCAB_SHIFT:self.vocab.coord_shift]
        score, cls = band.max(-1)
        boxes = self.vocab.dequantize(seq.view(B, n, 5)[..., :4])
        return boxes, cls, score  # band index k = class token 100 + k = label k

    def oracle_logits(self, target_seq: torch.Tensor) -> torch.Tensor:
        """One-hot logits of a sequence (the official sanity check decodes the ground truth this way)."""
        return torch.nn.functional.one_hot(target_seq, self.vocab.size).float() * 30.0
