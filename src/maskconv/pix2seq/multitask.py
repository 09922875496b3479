"""Pix2Seq v2: one model, several tasks, each a tokenizer on one shared vocabulary, picked by its prompt token.

``TaskSet`` holds the tokenizers of the tasks a model is trained for (``det``, ``seg``, ``kpt``, ``cap``) and the
vocabulary they share (coordinates, classes, caption words). Training (google-research/pix2seq
``models/model.py::Trainer.train_step``): every step holds one batch per task and the loss is the weighted sum of
the per-task losses. Here the batches of the tasks come from the same images, augmented once, so the encoder runs
once per step and its output is tiled over the objects of the instance tasks (the official ``_tile_vis_output``);
the official code gives each task its own data pipeline and encoder pass. One training row packs the input and
target sequences of every task (``MultiTaskTrainTransform``), so the one training loop (``engine/loop.fit``) and
its exact resume carry them unchanged.

Inference, per task as official: detection top-p 0.4; instance segmentation prompted by boxes (the ground truth's
or the model's own detections), 8 samples at top-p 0.8 whose rasterised masks are averaged and thresholded at
0.5; keypoints at top-p 0.1 with the invisible token suppressed and the mean token probability as score;
captioning at top-p 1.0, scored with BLEU-4 and CIDEr-D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PIX2SEQ_TASKS
from .caption import CaptionTokenizer, WordVocab
from .instance import KeypointTokenizer, SegmentationTokenizer, ensemble_masks, flip_pairs, instance_prompt, \
    rasterize_polygon
from .tokenizer import DetectionTokenizer
from .vocab import TASK_TOKENS, Vocab

__all__ = ["TASKS", "TaskSet", "MultiTaskTrainTransform", "parse_tasks", "task_weights", "multitask_losses",
           "evaluate_instance_task", "evaluate_captions", "COCO_PERSON_SIGMAS", "keypoint_sigmas", "prompted_instances"]

# short name (the config's vocabulary, pix2seq.tasks) -> prompt name (vocab.TASK_TOKENS)
TASKS = dict(zip(PIX2SEQ_TASKS, ("detection", "instance_segmentation", "keypoints", "captioning")))
# COCO's per-keypoint OKS sigmas of the 17 person keypoints (pycocotools cocoeval.py Params.setKpParams)
COCO_PERSON_SIGMAS = (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)


def parse_tasks(spec: str) -> tuple[str, ...]:
    """'det,seg,kpt,cap' -> ('det', 'seg', 'kpt', 'cap') in that canonical order; unknown names are an error."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"tasks {spec!r}: use a comma list of {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


def task_weights(tasks: tuple[str, ...], spec: str) -> dict[str, float]:
    """'' -> 1.0 each (the official multi-task config); else one number per task, in the ``tasks`` order."""
    if not spec:
        return {t: 1.0 for t in tasks}
    w = [float(v) for v in spec.split(",")]
    if len(w) != len(tasks) or min(w) < 0:
        raise ValueError(f"task_weights {spec!r}: need {len(tasks)} non-negative numbers for {','.join(tasks)}")
    return dict(zip(tasks, w))


def keypoint_sigmas(spec: str, k: int) -> list[float]:
    """OKS sigmas: '' -> COCO's person sigmas for 17 points, 0.05 each otherwise; else k numbers."""
    if spec:
        s = [float(v) for v in spec.split(",")]
        if len(s) != k:
            raise ValueError(f"kpt_sigmas {spec!r}: {len(s)} numbers for {k} keypoints")
        return s
    return [v / 10 for v in COCO_PERSON_SIGMAS] if k == 17 else [0.05] * k


@dataclass
class TaskSet:
    """The tokenizers of a model's tasks on one vocabulary, and how their sequences pack into one row."""
    vocab: Vocab
    tasks: tuple[str, ...]
    det: DetectionTokenizer | None = None
    seg: SegmentationTokenizer | None = None
    kpt: KeypointTokenizer | None = None
    cap: CaptionTokenizer | None = None
    keypoint_names: tuple[str, ...] = ()

    def tokenizer(self, task: str):
        return getattr(self, task)

    @property
    def max_len(self) -> int:
        """Decoder positions: the longest sequence of any task."""
        return max(self.tokenizer(t).seq_len for t in self.tasks)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per task the shape of its input (= target) sequence in one training row."""
        out = {}
        for t in self.tasks:
            tok = self.tokenizer(t)
            out[t] = (tok.max_instances, tok.seq_len) if t in ("seg", "kpt") else (tok.seq_len,)
        return out

    def pack(self, seqs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return torch.cat([torch.cat([seqs[t][0].reshape(-1), seqs[t][1].reshape(-1)]) for t in self.tasks])

    def unpack(self, rows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(B, row) -> per task (input, target), each (B, *shape)."""
        out, i = {}, 0
        for t, shape in self.shapes().items():
            n = math.prod(shape)
            inp, tgt = rows[:, i:i + n], rows[:, i + n:i + 2 * n]
            out[t] = (inp.reshape(-1, *shape), tgt.reshape(-1, *shape))
            i += 2 * n
        return out


def _yxyx(boxes_xyxy: torch.Tensor, size: int) -> torch.Tensor:
    return boxes_xyxy[:, [1, 0, 3, 2]] / size


def _swap_left_right(text: str) -> str:
    import re

    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", text)


class MultiTaskTrainTransform:
    """(uint8 image, COCO target) -> (normalized padded image, one row of every task's input and target tokens).
    The image is augmented once (official detection pipeline); polygon vertices and keypoints move with it.
    Keypoints that leave the crop become unlabelled; a horizontal flip swaps the left/right keypoints (the
    official code turns flipping off for keypoints because it does not) and the words left/right in captions."""
    joint = True

    def __init__(self, size: int, ts: TaskSet, jitter: tuple[float, float], hflip: bool = True):
        from ..data.coco import DetectionTrainTransform

        self.size, self.ts = size, ts
        self.image_tf = DetectionTrainTransform(size, jitter, hflip)
        self.flip_order = flip_pairs(ts.keypoint_names) if ts.kpt is not None else None

    def __call__(self, img: torch.Tensor, target: dict):
        from .task import normalize_image

        ts, size = self.ts, self.size
        need_points = ts.seg is not None or ts.kpt is not None
        if need_points:
            polys = target["polygons"] if ts.seg is not None else [[] for _ in target["labels"]]
            kps = target["keypoints"] if ts.kpt is not None else torch.zeros(len(target["labels"]), 0, 3)
            flat = [p for obj in polys for p in obj]
            pts = torch.cat(flat + [kps[..., :2].reshape(-1, 2)]) if flat or kps.numel() else torch.zeros(0, 2)
            target = {**target, "points": pts}
        img, t = self.image_tf(img, target)
        boxes, labels = _yxyx(t["boxes"], size), t["labels"]
        seqs = {}
        if ts.det is not None:
            seqs["det"] = ts.det.encode(boxes, labels, train=True)
        if need_points:
            keep = t["keep"].tolist()
            moved = t["points"][:, [1, 0]] / size  # (P, 2) yx in [0, 1] of the padded image
            i, obj_parts = 0, []
            for obj in polys:
                parts = []
                for p in obj:
                    parts.append(moved[i:i + len(p)].clamp(0, 1).double().numpy())
                    i += len(p)
                obj_parts.append(parts)
            kp_yx = moved[i:].reshape(len(kps), -1, 2)
            if ts.seg is not None:
                seqs["seg"] = ts.seg.encode(boxes, labels, [p for p, k in zip(obj_parts, keep) if k], train=True)
            if ts.kpt is not None:
                hs, ws = (v / size for v in t["unpadded_size"])
                inside = (kp_yx[..., 0] >= 0) & (kp_yx[..., 0] <= hs) & (kp_yx[..., 1] >= 0) & (kp_yx[..., 1] <= ws)
                v = torch.where(inside, kps[..., 2], torch.zeros_like(kps[..., 2]))
                k3 = torch.cat([kp_yx, v[..., None]], -1)
                if t["hflip"]:
                    k3 = k3[:, self.flip_order]
                seqs["kpt"] = ts.kpt.encode(boxes, labels, k3[torch.tensor(keep, dtype=torch.bool)], train=True)
        if ts.cap is not None:
            caps = target.get("captions")
            if caps:
                text = caps[int(torch.randint(len(caps), ()))]
                seqs["cap"] = ts.cap.encode(_swap_left_right(text) if t.get("hflip") else text, train=True)
            else:  # no caption: a row that weighs nothing (eval leaves such images out too)
                seqs["cap"] = ts.cap.encode_missing()
        return normalize_image(img), ts.pack(seqs)


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
    w = w.flatten().to(ce.device)
    return (ce * w).sum() / (w.sum() + 1e-9)  # official: sum(w * l) / (sum(w) + 1e-9)


def multitask_losses(model, ts: TaskSet, images: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task losses of one packed batch (``model`` may be wrapped by DDP: one forward call for all tasks);
    the encoder runs once and is tiled over the object rows of the instance tasks."""
    seqs = ts.unpack(rows)
    inputs, targets, tiles = [], [], []
    for t, (inp, tgt) in seqs.items():
        tiles.append(inp.shape[1] if inp.dim() == 3 else 1)  # (B, M, L): one row per object slot
        inputs.append(inp.flatten(0, 1) if inp.dim() == 3 else inp)
        targets.append(tgt.flatten(0, 1) if tgt.dim() == 3 else tgt)
    logits = model(images, inputs, tiles)
    return {t: _weighted_ce(lg, tgt, ts.tokenizer(t).weights(tgt))
            for t, lg, tgt in zip(seqs, logits, targets)}


# ------------------------------------------------------------------------------------------ evaluation

def prompted_instances(ts: TaskSet, task: str, images_mem: torch.Tensor, boxes: list[torch.Tensor],
                       labels: list[torch.Tensor], model, samples: int, top_p: float, temperature: float,
                       generator=None):
    """Generate the responses of the (image, box, class) prompts: returns (responses (N*samples, R), logits,
    image index of each row (N,)). ``images_mem`` is the encoded batch (B, S, dim)."""
    tok = ts.tokenizer(task)
    idx = torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes)]).long()
    if len(idx) == 0:
        return None, None, idx
    prompt = instance_prompt(tok.task, torch.cat(boxes), torch.cat(labels), ts.vocab)
    dev = images_mem.device
    mem = images_mem[idx.to(dev)].repeat_interleave(samples, 0)
    seq, logits = model.generate(None, prompt.repeat_interleave(samples, 0).to(dev), tok.response_len, temperature,
                                 top_p=top_p, memory=mem, generator=generator)
    return seq.cpu(), logits.cpu(), idx


@torch.no_grad()
def evaluate_instance_task(task: str, model, ts: TaskSet, data, o, size: int, in_chans: int = 3,
                           batch_size: int = 8, device=None, boxes_from: str = "gt", oracle: bool = False,
                           max_images: int | None = None, info=None) -> tuple[dict, list[dict]]:
    """segm AP (``task='seg'``) or keypoint AP (``'kpt'``) on COCO ``data``, prompts from the ground-truth boxes
    (``boxes_from='gt'``, the official ``use_gt_box_at_test``) or from the model's own detections (``'det'``,
    the real pipeline: its ``max_instances`` best-scoring boxes). ``oracle``: the ground truth's own tokens
    decoded instead of the model's (the pipeline's ceiling). ``info`` (several processes, every one calling
    this): each its share, scored on the main process; the others return ``({}, [])``."""
    from ..data.coco import coco_evaluate
    from ..engine import dist as D
    from .metrics import keypoint_result, mask_result
    from .task import eval_batches

    tok = ts.tokenizer(task)
    if model is not None:
        was = model.training
        model.eval()
        device = device or next(model.parameters()).device
    gen = torch.Generator(device=device or "cpu").manual_seed(0)
    results: list[dict] = []
    for images, targets in eval_batches(data, size, in_chans, batch_size, max_images, with_points=True, info=info):
        boxes, labels, scores, gts = [], [], [], []
        mem = model.encode(images.to(device)) if model is not None else None
        if boxes_from == "det" and model is not None:
            prompt = torch.full((len(images), 1), TASK_TOKENS["detection"], device=device)
            seq, logits = model.generate(None, prompt, ts.det.seq_len, o.temperature, top_p=o.top_p, memory=mem)
            b, c, s = ts.det.decode(logits.cpu(), seq.cpu())
            for bi, ci, si in zip(b, c, s):
                ok = (ci >= 1) & (ci <= data.num_classes) & (bi[:, 2] > bi[:, 0]) & (bi[:, 3] > bi[:, 1])
                top = si.masked_fill(~ok, -1).argsort(descending=True)[:tok.max_instances]
                top = top[ok[top]]
                boxes.append(bi[top])
                labels.append(ci[top])
                scores.append(si[top])
        else:
            for t in targets:
                sel = torch.ones(len(t["labels"]), dtype=torch.bool)
                if task == "kpt":
                    sel = t["keypoints"][..., 2].gt(0).any(-1)
                boxes.append(_yxyx(t["boxes"][sel], size))
                labels.append(t["labels"][sel])
                scores.append(torch.ones(int(sel.sum())))
                gts.append(sel)
        samples = o.seg_samples if task == "seg" else 1
        top_p = o.seg_top_p if task == "seg" else o.kpt_top_p
        if oracle:
            rows = []
            for t, sel in zip(targets, gts):
                if task == "seg":
                    polys = [p for p, k in zip(t["polygons_yx"], sel.tolist()) if k]
                    rows.append(tok.response(polys))
                else:
                    rows.append(tok.points(t["keypoints_yx"][sel]))
            from .instance import points_to_tokens

            pts = torch.cat(rows) if rows else torch.zeros(0, tok.response_len)
            seq = points_to_tokens(pts, torch.ones(len(pts), dtype=torch.long), ts.vocab)
            logits = F.one_hot(seq, ts.vocab.size).float() * 30.0
            idx = torch.cat([torch.full((int(g.sum()),), i) for i, g in enumerate(gts)]).long()
            samples = 1
        else:
            seq, logits, idx = prompted_instances(ts, task, mem, boxes, labels, model, samples, top_p, o.temperature, gen)
        if len(idx) == 0:
            continue
        all_boxes, all_labels, all_scores = torch.cat(boxes), torch.cat(labels), torch.cat(scores)
        if task == "seg":
            parts = tok.decode(seq)
        else:
            pts, kscore = tok.decode(logits, seq, all_boxes, o.temperature, top_p, generator=gen)
        for n in range(len(idx)):
            t = targets[int(idx[n])]
            sy, sx = t["scale"]
            h, w = t["orig_size"]
            img_id, cat = t["image_id"], int(all_labels[n])
            if task == "seg":
                masks = np.stack([rasterize_polygon([p * [size / sy, size / sx] for p in parts[n * samples + j]],
                                                    h, w) for j in range(samples)])
                m = ensemble_masks(masks, o.seg_threshold)
                if m.any():
                    results.append(mask_result(m, img_id, cat, float(all_scores[n])))
            else:
                xy = (pts[n].double() * torch.tensor([size / sy, size / sx], dtype=torch.float64))[:, [1, 0]]
                results.append(keypoint_result(xy.numpy(), img_id, cat, float(kscore[n])))
    if model is not None and was:
        model.train()
    parts = D.gather_to_main(results, info or D.DistInfo())
    if parts is None:
        return {}, []
    results = [r for part in parts for r in part]
    if task == "seg":
        res = coco_evaluate(data.gt, results, iou_type="segm")
    else:
        k = len(data.keypoint_names or ())
        res = coco_evaluate(data.gt, results, iou_type="keypoints", kpt_oks_sigmas=keypoint_sigmas(o.kpt_sigmas, k))
    return res, results


@torch.no_grad()
def evaluate_captions(model, ts: TaskSet, data, o, size: int, in_chans: int = 3, batch_size: int = 8,
                      device=None, max_images: int | None = None, oracle: bool = False,
                      info=None) -> tuple[dict, list[dict]]:
    """BLEU-4 and CIDEr-D of the model's captions (top-p ``o.cap_top_p``) against the file's captions.
    ``info`` (several processes, every one calling this): each its share, scored on the main process; the
    others return ``({}, [])``."""
    from ..engine import dist as D
    from .metrics import bleu4, caption_words, cider_d
    from .task import eval_batches

    if not data.captions:
        raise ValueError(f"{data.path}: no captions to score the captioning task against")
    if model is not None:
        was = model.training
        model.eval()
        device = device or next(model.parameters()).device
    gen = torch.Generator(device=device or "cpu").manual_seed(0)
    rows = []
    for images, targets in eval_batches(data, size, in_chans, batch_size, max_images, info=info):
        if oracle:
            texts = [(data.captions[t["image_id"]] or [""])[0] for t in targets]
            texts = ts.cap.decode(torch.stack([ts.cap.response(x) for x in texts]))
        else:
            prompt = torch.full((len(images), 1), TASK_TOKENS["captioning"], device=device)
            seq, _ = model.generate(images.to(device), prompt, ts.cap.seq_len, o.temperature, top_p=o.cap_top_p,
                                    generator=gen)
            texts = ts.cap.decode(seq.cpu())
        rows += [{"image_id": t["image_id"], "caption": x} for t, x in zip(targets, texts)]
    if model is not None and was:
        model.train()
    parts = D.gather_to_main(rows, info or D.DistInfo())
    if parts is None:
        return {}, []
    rows = [r for part in parts for r in part]
    scored = [r for r in rows if data.captions[r["image_id"]]]  # images without a caption are not scored
    if not scored:
        raise ValueError(f"{data.path}: none of the scored images has a caption")
    cands = [caption_words(r["caption"]) for r in scored]
    refs = [[caption_words(c) for c in data.captions[r["image_id"]]] for r in scored]
    return {"BLEU4": bleu4(cands, refs), "CIDEr": cider_d(cands, refs), "images": len(scored)}, rows


def build_taskset(o, img_size: int, words: list[str] | None = None, keypoint_names=None) -> TaskSet:
    """The tokenizers of ``o.tasks`` (``o``: ``Pix2SeqOptions``) on one vocabulary."""
    tasks = parse_tasks(o.tasks)
    wv = WordVocab(list(words)) if "cap" in tasks else None
    if "cap" in tasks and not words:
        raise ValueError("the captioning task needs a word list (built from the training captions)")
    if "kpt" in tasks and not keypoint_names:
        raise ValueError("the keypoint task needs keypoint names (the categories' 'keypoints' in the COCO file)")
    vocab = Vocab(o.resolved_bins(img_size), text_size=len(wv) if wv else 0)
    ts = TaskSet(vocab, tasks, keypoint_names=tuple(keypoint_names or ()))
    if "det" in tasks:
        ts.det = DetectionTokenizer(vocab, o.max_objects, o.noise, o.corruption,
                                    noise_bbox_weight=o.noise_bbox_weight, eos_token_weight=o.eos_token_weight)
    if "seg" in tasks:
        ts.seg = SegmentationTokenizer(vocab, o.seg_max_instances, o.seg_max_points, o.seg_eos_weight)
    if "kpt" in tasks:
        ts.kpt = KeypointTokenizer(vocab, len(keypoint_names), o.kpt_max_instances, o.kpt_invisible_weight,
                                   o.kpt_eos_weight)
    if "cap" in tasks:
        ts.cap = CaptionTokenizer(vocab, wv, o.cap_max_len, o.cap_eos_weight, o.cap_input_drop)
    return ts
