"""Pix2Seq v2 instance tasks: one sequence per object, prompted by ``[task, ymin, xmin, ymax, xmax, class]``.

* instance segmentation (task 11): the response is the object's polygon as quantized (y, x) pairs, the parts of a
  multi-part polygon joined by a separator pair, then padding (the end);
* keypoints (task 12): the response is one (y, x) pair per keypoint, unlabelled points (COCO v = 0) as an
  invisible pair.

Sources (google-research/pix2seq): ``tasks/task_utils.py`` (``build_instance_prompt_seq``,
``build_instance_response_seq_from_points``, ``decode_instance_seq_to_points``, ``compute_weighted_scores``),
``tasks/instance_segmentation.py`` and ``tasks/keypoint_detection.py`` (``preprocess_batched``: sequences, weights,
the keypoints' input corruption; ``infer``/``postprocess``: invisible-token suppression, box-centre fill, mask
ensemble), ``data/coco.py`` (``set_invisible_points``). Points are (y, x) in [0, 1] of the padded image; the
official reserved floats stand for tokens inside point lists: -1 padding, -2 separator, -3 invisible.

Capping polygons: the official reader cuts the flattened polygon at ``max_points`` (the tail is lost, the outline
is left open). Here a polygon over the cap is simplified with Douglas-Peucker on each closed part, the tolerance
doubling from half a bin until it fits (smallest parts dropped only if 3 points each still do not fit).
Douglas-Peucker rather than uniform arc-length resampling: it keeps a subset of the true vertices (a polygon under
the cap is untouched, so an oracle is exact; corners survive, which resampling rounds off) and its error is bounded
by the tolerance, which starts below quantization's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .vocab import INVISIBLE_TOKEN, PADDING_TOKEN, SEPARATOR_TOKEN, TASK_TOKENS, Vocab

__all__ = ["PAD_FLOAT", "SEP_FLOAT", "INVISIBLE_FLOAT", "instance_prompt", "points_to_tokens", "tokens_to_points",
           "instance_sequences", "instance_token_weights", "simplify_ring", "cap_polygon", "flatten_polygon",
           "split_polygon", "SegmentationTokenizer", "KeypointTokenizer", "flip_pairs", "rasterize_polygon",
           "ensemble_masks", "PROMPT_LEN"]

PAD_FLOAT, SEP_FLOAT, INVISIBLE_FLOAT = -1.0, -2.0, -3.0
_RESERVED = ((PAD_FLOAT, PADDING_TOKEN), (SEP_FLOAT, SEPARATOR_TOKEN), (INVISIBLE_FLOAT, INVISIBLE_TOKEN))
PROMPT_LEN = 6  # task, 4 box coordinates, class


def instance_slots(tok, keep: list[int], boxes: torch.Tensor, labels: torch.Tensor, points, train: bool):
    """The ``tok.max_instances`` object slots of one image: objects ``keep`` (a random subset in training, as the
    official reader; the first ones otherwise), their prompts and point responses, free slots padding.
    ``points(kept_indices)`` gives the kept objects' point floats (n, response_len). Returns (prompt, response
    tokens), each (max_instances, ...)."""
    if train:
        keep = [keep[i] for i in torch.randperm(len(keep)).tolist()]
    keep = keep[:tok.max_instances]
    M = tok.max_instances
    b, lab = torch.zeros(M, 4), torch.zeros(M, dtype=torch.long)
    pts = torch.full((M, tok.response_len), PAD_FLOAT)
    if keep:
        b[:len(keep)], lab[:len(keep)] = boxes[keep].float(), labels[keep].long()
        pts[:len(keep)] = points(keep)
    return instance_prompt(tok.task, b, lab, tok.vocab), points_to_tokens(pts, lab, tok.vocab)


def instance_prompt(task: str, boxes: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """``boxes`` (..., N, 4) yxyx in [0, 1], ``labels`` (..., N) -> prompts (..., N, 6); all-zero where the label
    is 0 (a padding slot), as official ``build_instance_prompt_seq``."""
    q = vocab.quantize(boxes)
    cls = vocab.class_token(labels.long())[..., None]
    seq = torch.cat([torch.full_like(cls, TASK_TOKENS[task]), q, cls], -1)
    return torch.where((labels == 0)[..., None], torch.zeros_like(seq), seq)


def points_to_tokens(points: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Point floats (..., N, P) -> tokens: coordinates quantized, reserved floats to their tokens, rows of padding
    slots (label 0) all padding (official ``build_instance_response_seq_from_points``)."""
    tok = vocab.quantize(points)
    for f, t in _RESERVED:
        tok = torch.where(points == f, torch.full_like(tok, t), tok)
    return torch.where((labels == 0)[..., None], torch.zeros_like(tok), tok)


def tokens_to_points(tokens: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Tokens -> point floats: coordinates dequantized, reserved tokens to their floats, any other token (a class,
    a task id, text) NaN: it names no place (official ``decode_instance_seq_to_points`` leaves such values to
    chance)."""
    is_coord = (tokens >= vocab.coord_shift) & (tokens < vocab.coord_shift + vocab.bins)
    out = torch.where(is_coord, vocab.dequantize(tokens), torch.full(tokens.shape, float("nan")))
    for f, t in _RESERVED:
        out = torch.where(tokens == t, torch.full_like(out, f), out)
    return out


def instance_sequences(prompt: torch.Tensor, response: torch.Tensor, seq_len: int):
    """``[prompt, response]`` padded (or cut) to ``seq_len + 1`` -> (input = all but the last, target = all but the
    first), each (..., seq_len): the official ``pad_to_max_len`` then shift."""
    seq = torch.cat([prompt, response], -1)[..., :seq_len + 1]
    seq = torch.nn.functional.pad(seq, (0, seq_len + 1 - seq.shape[-1]), value=PADDING_TOKEN)
    return seq[..., :-1], seq[..., 1:]


def instance_token_weights(target: torch.Tensor, eos_token_weight: float,
                           invisible_token_weight: float | None = None) -> torch.Tensor:
    """Official weights of an instance target (..., L): the 5 prompt targets 0, response 1, invisible targets
    ``invisible_token_weight`` (keypoints), padding/end ``eos_token_weight``. A padding slot's target is all
    padding, so it weighs ``eos_token_weight`` everywhere, as in the official order of ``tf.where``s."""
    w = torch.ones(target.shape, device=target.device)  # on the target's device: no host round trip
    w[..., :PROMPT_LEN - 1] = 0.0
    if invisible_token_weight is not None:
        w = torch.where(target == INVISIBLE_TOKEN, torch.full_like(w, invisible_token_weight), w)
    return torch.where(target == PADDING_TOKEN, torch.full_like(w, eos_token_weight), w)


# ----------------------------------------------------------------------------------------------- polygons

def _dp_chain(pts: np.ndarray, tol: float) -> list[int]:
    """Douglas-Peucker on an open chain (K, 2): indices kept (first and last always)."""
    keep = [0, len(pts) - 1]
    stack = [(0, len(pts) - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = pts[b] - pts[a]
        rel = pts[a + 1:b] - pts[a]
        n = float(np.hypot(*seg))
        d = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / n if n > 0 else np.hypot(rel[:, 0], rel[:, 1])
        i = int(np.argmax(d))
        if d[i] > tol:
            keep.append(a + 1 + i)
            stack += [(a, a + 1 + i), (a + 1 + i, b)]
    return sorted(set(keep))


def simplify_ring(ring: np.ndarray, tol: float) -> np.ndarray:
    """A closed polygon (K, 2) simplified by Douglas-Peucker (split at the vertex farthest from the first);
    always at least 3 vertices, in their original order."""
    k = len(ring)
    if k <= 3 or tol <= 0:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    if far == 0:
        return ring[[0, k // 3, 2 * k // 3]]
    first = _dp_chain(ring[:far + 1], tol)
    second = [far + i for i in _dp_chain(np.concatenate([ring[far:], ring[:1]]), tol)]
    idx = sorted(set(first + [i % k for i in second]))
    if len(idx) < 3:
        rest = [i for i in range(k) if i not in idx]
        idx = sorted(idx + [rest[len(rest) // 2]])
    return ring[idx]


def _area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _count(parts: list) -> int:  # points in the flattened sequence: vertices + one separator between parts
    return sum(len(p) for p in parts) + max(0, len(parts) - 1)


def cap_polygon(parts: list[np.ndarray], max_points: int, tol: float) -> list[np.ndarray]:
    """Parts (each (K, 2)) -> parts whose flattened length (vertices + separators) is <= ``max_points``:
    Douglas-Peucker with tolerance ``tol``, doubled until it fits; then the smallest parts are dropped."""
    if max_points < 3:
        raise ValueError(f"max_points {max_points}: a polygon needs at least 3 points")
    parts = [np.asarray(p, np.float64) for p in parts if len(p) >= 3]
    out = parts
    while _count(out) > max_points and tol < 4.0:
        out = [simplify_ring(p, tol) for p in parts]
        tol *= 2
    while _count(out) > max_points and len(out) > 1:
        out.pop(int(np.argmin([_area(p) for p in out])))
    return out


def flatten_polygon(parts: list[np.ndarray], max_points: int, tol: float) -> torch.Tensor:
    """Parts ((K, 2) yx in [0, 1]) -> (2 * max_points,) floats: capped parts joined by a separator pair, padded
    with the padding float (official ``flatten_segmentation`` + ``to_tensor(default_value=PADDING_FLOAT)``)."""
    flat: list[float] = []
    for i, p in enumerate(cap_polygon(parts, max_points, tol)):
        if i:
            flat += [SEP_FLOAT, SEP_FLOAT]
        flat += np.asarray(p, np.float64).reshape(-1).tolist()
    return torch.tensor(flat + [PAD_FLOAT] * (2 * max_points - len(flat)), dtype=torch.float32)


def split_polygon(points: torch.Tensor) -> list[np.ndarray]:
    """Decoded point floats (2P,) -> parts ((K, 2) yx): reading stops at the first padding (the end), separators
    split parts, non-coordinate values are skipped, parts with under 3 vertices are dropped."""
    pts = points.reshape(-1, 2).tolist()
    parts, cur = [], []
    for y, x in pts:
        if y == PAD_FLOAT or x == PAD_FLOAT:
            break
        if y == SEP_FLOAT or x == SEP_FLOAT:
            parts.append(cur)
            cur = []
        elif y >= 0 and x >= 0:  # NaN and other reserved floats fail this
            cur.append((y, x))
    parts.append(cur)
    return [np.asarray(p, np.float64) for p in parts if len(p) >= 3]


def rasterize_polygon(parts: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Parts in pixel (y, x) -> a (h, w) bool mask (pycocotools, as the official ``segment_to_mask_rle``)."""
    from pycocotools import mask as mask_utils

    if not parts:
        return np.zeros((h, w), bool)
    polys = [np.asarray(p, np.float64)[:, ::-1].reshape(-1).tolist() for p in parts]  # COCO wants x, y
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)


def ensemble_masks(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Official ``ensemble_mask_np``: the mean of S sampled masks (S, h, w), thresholded."""
    return masks.astype(np.float32).mean(0) > threshold


@dataclass
class SegmentationTokenizer:
    """Objects with polygons -> one (input, target) row pair per object slot; decoded rows -> polygon parts.
    Defaults: the official multi-task config (10 instances, 128 points, end weight 1.0)."""
    vocab: Vocab
    max_instances: int = 10
    max_points: int = 128
    eos_token_weight: float = 1.0
    task: str = "instance_segmentation"

    @property
    def seq_len(self) -> int:  # prompt targets (5) + response
        return PROMPT_LEN - 1 + 2 * self.max_points

    @property
    def response_len(self) -> int:
        return 2 * self.max_points

    def response(self, polygons: list[list[np.ndarray]]) -> torch.Tensor:
        """Polygons (per object: parts (K, 2) yx in [0, 1]) -> point floats (N, 2 * max_points)."""
        tol = 0.5 / (self.vocab.bins - 1)  # half a bin: the first rung changes no quantized vertex by more
        rows = [flatten_polygon(p, self.max_points, tol) for p in polygons]
        return torch.stack(rows) if rows else torch.zeros(0, self.response_len)

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor, polygons: list[list[np.ndarray]],
               train: bool = True):
        """``boxes`` (N, 4) yxyx, ``labels`` (N,), ``polygons`` -> (input, target), each (max_instances, seq_len).
        Objects without a polygon are skipped; over ``max_instances`` a random subset is kept in training (the
        official reader), the first ones otherwise; free slots are padding."""
        keep = [i for i, p in enumerate(polygons) if any(len(q) >= 3 for q in p)]
        prompt, response = instance_slots(self, keep, boxes, labels, lambda k: self.response([polygons[i] for i in k]),
                                          train)
        return instance_sequences(prompt, response, self.seq_len)

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        return instance_token_weights(target, self.eos_token_weight)

    def decode(self, response: torch.Tensor) -> list[list[np.ndarray]]:
        """Generated responses (N, R) -> per row the polygon parts ((K, 2) yx in [0, 1])."""
        pts = tokens_to_points(response, self.vocab)
        return [split_polygon(r) for r in pts]


def flip_pairs(names: list[str] | tuple[str, ...]) -> list[int]:
    """The keypoint order after a horizontal flip: names with 'left' trade places with their 'right' twins
    (COCO's left_eye/right_eye, the scenes' left/right); the others stay."""
    order = list(range(len(names)))
    for i, n in enumerate(names):
        if "left" in n:
            twin = n.replace("left", "right")
            if twin in names:
                j = list(names).index(twin)
                order[i], order[j] = j, i
    return order


@dataclass
class KeypointTokenizer:
    """Objects with keypoints -> one (input, target) row pair per object slot; decoded rows -> points and scores.
    Defaults as the official keypoint config: invisible weight 0.1, end weight 0, corruption on in training."""
    vocab: Vocab
    num_keypoints: int
    max_instances: int = 10
    invisible_token_weight: float = 0.1
    eos_token_weight: float = 0.0
    corrupt: bool = True
    task: str = "keypoints"

    @property
    def seq_len(self) -> int:
        return PROMPT_LEN - 1 + 2 * self.num_keypoints

    @property
    def response_len(self) -> int:
        return 2 * self.num_keypoints

    def points(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(N, K, 3) (y, x, v) with y, x in [0, 1] -> (N, 2K) floats; v = 0 (unlabelled) -> the invisible pair,
        v = 1 (labelled, occluded) keeps its place (official ``set_invisible_points``)."""
        yx = keypoints[..., :2].float()
        yx = torch.where((keypoints[..., 2:] == 0), torch.full_like(yx, INVISIBLE_FLOAT), yx)
        return yx.reshape(len(keypoints), -1)

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor, keypoints: torch.Tensor, train: bool = True):
        """``boxes`` (N, 4) yxyx, ``labels`` (N,), ``keypoints`` (N, K, 3) -> (input, target), each
        (max_instances, seq_len). Objects with no labelled point are skipped. Training corrupts the input: each
        response input token turns invisible with probability ``ratio ~ U(0, 1)`` (official: one ratio per batch;
        here per image, drawn where the sequences are built)."""
        keep = [i for i in range(len(labels)) if bool((keypoints[i, :, 2] > 0).any())]
        prompt, response = instance_slots(self, keep, boxes, labels, lambda k: self.points(keypoints[k]), train)
        inp, tgt = instance_sequences(prompt, response, self.seq_len)
        if train and self.corrupt:
            ratio = torch.rand(())
            mask = torch.rand(inp.shape) < ratio
            mask[:, :PROMPT_LEN] = False  # the prompt is never masked
            inp = torch.where(mask, torch.full_like(inp, INVISIBLE_TOKEN), inp)
        return inp, tgt

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        return instance_token_weights(target, self.eos_token_weight, self.invisible_token_weight)

    def decode(self, logits: torch.Tensor, response: torch.Tensor, boxes: torch.Tensor, temperature: float = 1.0,
               top_p: float = 1.0, suppress_invisible: bool = True, generator: torch.Generator | None = None):
        """Official keypoint post-processing. ``logits`` (N, 2K, V) and sampled ``response`` (N, 2K), prompt boxes
        (N, 4) -> points (N, K, 2) yx in [0, 1] and scores (N,). With ``suppress_invisible``, an invisible token
        that was sampled is resampled from its logits without it; the score is the mean probability of the
        response tokens under those logits; points still not a coordinate go to the box centre."""
        from .model import top_p_top_k

        logits = logits.float()
        if suppress_invisible:
            logits = logits.clone()
            logits[..., INVISIBLE_TOKEN] -= 1e9
            flat = top_p_top_k(logits.flatten(0, 1) / temperature, 0, top_p)
            redraw = torch.multinomial(flat.softmax(-1), 1, generator=generator).view(response.shape)
            response = torch.where(response == INVISIBLE_TOKEN, redraw, response)
        p = logits.softmax(-1).gather(-1, response[..., None])[..., 0]  # (N, 2K)
        notpad = (response != PADDING_TOKEN).float()
        scores = (p * notpad).sum(-1) / notpad.sum(-1).clamp_min(1)
        pts = tokens_to_points(response, self.vocab).view(len(response), -1, 2)
        centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)[:, None]
        bad = ~((pts >= 0) & (pts <= 1)).all(-1, keepdim=True)  # invisible, padding or not a coordinate
        return torch.where(bad, centre.expand_as(pts), pts), scores

