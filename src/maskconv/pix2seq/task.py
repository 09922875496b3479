"""Pix2Seq (detection, and the v2 tasks) behind ``maskconv pix2seq train | eval | predict``, through the one loop.

The engine trains on ``(images, labels)`` batches: here each label is one row of tokens, the input sequence
followed by the target sequence (token weights are a function of the target, ``tokenizer.token_weights``), made
by ``MultiTaskTrainTransform`` inside ``SeededDataset`` so noise boxes and crops are reproducible on resume;
with several tasks (``Pix2SeqOptions.tasks``) the row packs every task's sequences (``multitask.TaskSet``).
A run folder holds the engine's files (``last.pt``, ``metrics.jsonl``, ``config.json``), ``pix2seq.json`` (the
options and classes needed to rebuild the model) and ``model.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..commands import Command, add_config_flags, config_from_args
from ..config import Pix2SeqOptions, check_section
from ..engine.rundir import RunDir
from ..data.coco import CocoData, CocoDetection, DetectionEvalTransform, coco_evaluate, load_coco
from .model import Pix2Seq
from .tokenizer import DetectionTokenizer
from .vocab import TASK_TOKENS, Vocab

__all__ = ["Pix2SeqOptions", "build_pix2seq", "run_pix2seq_train", "run_pix2seq_eval", "run_pix2seq_predict",
           "evaluate_detection", "evaluate_tasks", "detections_to_coco", "eval_batches", "normalize_image",
           "taskset_from_meta", "PREDICT_TASKS"]

OPTIONS_FILE = RunDir.PIX2SEQ


def _tokenizer(o: Pix2SeqOptions, img_size: int) -> DetectionTokenizer:
    return DetectionTokenizer(Vocab(o.resolved_bins(img_size)), o.max_objects, o.noise, o.corruption,
                              noise_bbox_weight=o.noise_bbox_weight, eos_token_weight=o.eos_token_weight)


def build_pix2seq(backbone: str, o: Pix2SeqOptions, img_size: int, in_chans: int = 3, taskset=None,
                  **backbone_kwargs) -> Pix2Seq:
    """The model for ``o``'s tasks: vocabulary and decoder positions from ``taskset`` (``multitask.TaskSet``;
    default: detection only)."""
    from ..models import create_model
    from ..models.dense import freeze_unused

    if "vit" in backbone or "convmae" in backbone:
        backbone_kwargs.setdefault("img_size", img_size)
    enc = create_model(backbone, num_classes=0, in_chans=in_chans, **backbone_kwargs)
    freeze_unused(enc, 1, 2 * enc.feature_info[-1]["reduction"])  # the head's norm: unused by the last map (DDP)
    if taskset is None:
        vocab, max_len = _tokenizer(o, img_size).vocab, 5 * o.max_objects
    else:
        vocab, max_len = taskset.vocab, taskset.max_len
    return Pix2Seq(enc, vocab.size, max_len, o.dim, o.depth, o.heads, o.mlp_ratio, o.drop, o.drop_path)


def normalize_image(img: torch.Tensor) -> torch.Tensor:
    """A [0, 1] image (C, H, W) -> normalized with the backbone's default mean/std."""
    return _normalize(img)


def _normalize(img: torch.Tensor) -> torch.Tensor:
    from ..data.photos import default_norm

    mean, std = default_norm(img.shape[-3])
    return (img - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _yxyx(boxes_xyxy: torch.Tensor, size: int) -> torch.Tensor:
    return boxes_xyxy[:, [1, 0, 3, 2]] / size


def detections_to_coco(boxes: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, image_id: int,
                       size: int, scale: tuple[float, float], num_classes: int) -> list[dict]:
    """One image's decoded objects (yxyx in [0, 1] of the padded input) -> COCO results in original pixels.
    Class tokens that name no category (the padding label 0, unused class slots) and boxes with no extent
    (a max coordinate not above its min) are left out: neither can match an object."""
    px = boxes.float() * size / torch.tensor([scale[0], scale[1], scale[0], scale[1]])  # yxyx, original px
    out = []
    for (y0, x0, y1, x1), c, s in zip(px.tolist(), classes.tolist(), scores.tolist()):
        if 1 <= c <= num_classes and y1 > y0 and x1 > x0:
            out.append({"image_id": image_id, "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(s)})
    return out


def eval_batches(data: CocoData, size: int, in_chans: int, batch_size: int, max_images: int | None = None,
                 with_points: bool = False, info=None):
    """(normalized images (B, C, size, size), targets) of ``data`` through the eval transform. Targets hold
    ``scale`` and ``orig_size``; ``with_points`` adds ``polygons_yx`` (per object its parts, (K, 2) yx in [0, 1]
    of the padded input) and ``keypoints_yx`` ((N, K, 3) y, x in [0, 1], v). ``info``: this process's share of
    the images only (``dist.eval_share``)."""
    from ..engine import dist as D

    ds = CocoDetection(data, in_chans, train=False)
    tf = DetectionEvalTransform(size)
    batch = []
    n = len(ds) if max_images is None else min(len(ds), max_images)
    share = D.eval_share(n, info) if info is not None else range(n)
    for i in share:
        item = ds[i]
        if item is None:
            raise ValueError(f"{data.image_dir / ds.images[i]['file_name']}: the image cannot be decoded")
        img, t = tf(*item)
        t["orig_size"] = tuple(item[0].shape[-2:])
        if with_points:
            sy, sx = t["scale"]
            k = torch.tensor([sy / size, sx / size], dtype=torch.float64)
            t["polygons_yx"] = [[(p.double()[:, [1, 0]] * k).numpy() for p in obj] for obj in t["polygons"]]
            if "keypoints" in t:
                kp = t["keypoints"]
                t["keypoints_yx"] = torch.cat([kp[..., [1, 0]] * k.float(), kp[..., 2:]], -1)
        batch.append((_normalize(img), t))
        if len(batch) == batch_size or i == share[-1]:
            yield torch.stack([b[0] for b in batch]), [b[1] for b in batch]
            batch = []


@torch.no_grad()
def evaluate_detection(model: Pix2Seq, data: CocoData, o: Pix2SeqOptions, size: int, in_chans: int = 3,
                       batch_size: int = 16, device=None, oracle: bool = False,
                       max_images: int | None = None, info=None) -> tuple[dict, list[dict]]:
    """COCO AP / AP50 / AP75 on ``data`` and the detections (remapped ids). ``oracle``: decode the ground truth
    (tokenized, one-hot logits) instead of the model's output - the pipeline's own ceiling, 1.0 up to bins.
    ``info`` (several processes, every one calling this): each its share, scored on the main process
    (``dist.gather_to_main``); the others return ``({}, [])``."""
    from ..engine import dist as D

    tok = _tokenizer(o, size)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        device = device or next(model.parameters()).device
    dets: list[dict] = []
    for images, targets in eval_batches(data, size, in_chans, batch_size, max_images, info=info):
        if oracle:
            seq = torch.stack([tok.encode(_yxyx(t["boxes"], size), t["labels"], train=False)[1] for t in targets])
            logits = tok.oracle_logits(seq)
        else:
            prompt = torch.full((len(images), 1), TASK_TOKENS["detection"], device=device)
            seq, logits = model.generate(images.to(device), prompt, tok.seq_len, o.temperature, top_p=o.top_p)
        boxes, classes, scores = tok.decode(logits.cpu(), seq.cpu())
        for b, c, s, t in zip(boxes, classes, scores, targets):
            dets += detections_to_coco(b, c, s, t["image_id"], size, t["scale"], data.num_classes)
    if model is not None and was_training:
        model.train()
    parts = D.gather_to_main(dets, info or D.DistInfo())
    if parts is None:
        return {}, []
    dets = [d for part in parts for d in part]
    return coco_evaluate(data.gt, dets), dets


def _to_file_ids(dets: list[dict], data: CocoData) -> list[dict]:
    """Remapped ids -> the ids of the user's file (COCO results format against their own JSON)."""
    return [{**d, "image_id": data.orig_image_ids[d["image_id"] - 1],
             "category_id": data.orig_category_ids[d["category_id"] - 1]} for d in dets]


def run_pix2seq_train(cfg, o: Pix2SeqOptions | None = None, val: str | None = None):
    """Train Pix2Seq on the COCO data at ``cfg.data.path`` (backbone ``cfg.model.name``, encoder weights from
    ``cfg.model.init``) with the task settings ``cfg.pix2seq`` (a recipe's ``pix2seq:`` section, ``pix2seq.*``
    keys); ``o``, when given, replaces them (config.json and pix2seq.json record what ran). ``val``: COCO data
    scored (AP) after each evaluated epoch. Returns the ``FitResult``."""
    from ..engine import dist as D
    from ..engine.loop import fit
    from ..models import architecture_kwargs, load_checkpoint, save_weights

    from .caption import WordVocab
    from .multitask import MultiTaskTrainTransform, build_taskset, multitask_losses, parse_tasks, task_weights

    if o is not None:
        cfg.pix2seq = o
    o = check_section(cfg.pix2seq, "pix2seq")  # set field by field (API) or whole: checked as validate() does
    cfg.task = "pix2seq"
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    size, in_chans = cfg.data.img_size, cfg.model.in_chans
    data = load_coco(cfg.data.path)
    if data.num_classes > Vocab().max_classes:
        raise ValueError(f"{data.path}: {data.num_classes} categories; the vocabulary holds {Vocab().max_classes}")
    tasks = parse_tasks(o.tasks)
    if "cap" in tasks and not (data.captions and any(data.captions.values())):
        raise ValueError(f"{data.path}: --tasks names cap but the file has no captions (a top-level 'captions' list)")
    if "kpt" in tasks and not data.keypoint_names:
        raise ValueError(f"{data.path}: --tasks names kpt but no category declares 'keypoints'")
    if "seg" in tasks and not any(isinstance(a.get("segmentation"), list) for a in data.gt["annotations"]):
        raise ValueError(f"{data.path}: --tasks names seg but no annotation has a polygon segmentation")
    words = WordVocab.build(c for cs in data.captions.values() for c in cs).words if "cap" in tasks else None
    ts = build_taskset(o, size, words, data.keypoint_names)
    weights = task_weights(tasks, o.task_weights)
    out = Path(cfg.run.out)
    enc_kw = architecture_kwargs(cfg.model.name, cfg.model.stem_stride, cfg.model.width_mult)
    meta = {"backbone": cfg.model.name, "backbone_kwargs": enc_kw, "img_size": size, "in_chans": in_chans,
            "options": asdict(o),
            "categories": data.category_names, "category_ids": data.orig_category_ids}
    if words is not None:
        meta["words"] = words
    if "kpt" in tasks:
        meta["keypoint_names"] = data.keypoint_names
        meta["skeleton"] = next((c.get("skeleton") for c in data.gt["categories"] if c.get("keypoints")), None)
    if (out / OPTIONS_FILE).exists():  # resuming: the same task settings, or a clear refusal
        have = json.loads((out / OPTIONS_FILE).read_text())
        if have != json.loads(json.dumps(meta)):
            raise ValueError(f"{out / OPTIONS_FILE} was written with other settings or data; choose another --out")
    model = build_pix2seq(cfg.model.name, o, size, in_chans, ts, drop_path_rate=cfg.model.drop_path_rate, **enc_kw)
    if cfg.model.init:
        rep = load_checkpoint(model.encoder, cfg.model.init, drop_mismatched_head=True)
        print(f"encoder init from {cfg.model.init} ({rep.layout} layout)")
    tf = MultiTaskTrainTransform(size, ts, (o.jitter_min, o.jitter_max), o.hflip)
    val_data = load_coco(val) if val else None  # every process decodes its share, the main one scores
    if val_data is not None and cfg.run.fsdp and info.world > 1:
        # generate() decodes through the model's own methods, not its forward: FSDP2 gathers the sharded
        # parameters in forward hooks only, so a sharded Pix2Seq cannot decode. Train with DDP to validate.
        if info.is_main:
            print("note: pix2seq validation is skipped under run.fsdp (decoding bypasses FSDP's forward); "
                  "score the run with maskconv pix2seq eval", flush=True)
        val_data = None

    def loss_fn(m, x, y):  # the weighted sum of the task losses (official Trainer.train_step)
        return sum(weights[t] * v for t, v in multitask_losses(m, ts, x, y).items())

    def evaluate(m):
        if val_data is None:
            return {}
        return {f"val_{k}": v for k, v in evaluate_tasks(m, ts, val_data, o, size, in_chans, cfg.data.batch_size,
                                                         info.device, info=info).items()}

    res = fit(cfg, model, CocoDetection(data, in_chans, train=True), tf, loss_fn, task="pix2seq",
              evaluate=evaluate, info=info, files={OPTIONS_FILE: json.dumps(meta, indent=1)})  # written once locked
    if info.is_main:
        save_weights(res.state_dict if res.state_dict is not None else model, res.out / RunDir.MODEL,
                     metadata={"architecture": f"pix2seq:{cfg.model.name}"})
    res.run.release()
    return res


def taskset_from_meta(meta: dict, o: Pix2SeqOptions):
    """The ``multitask.TaskSet`` a run was trained with (its words and keypoint names are in ``pix2seq.json``)."""
    from .multitask import build_taskset

    return build_taskset(o, meta["img_size"], meta.get("words"), meta.get("keypoint_names"))


def load_pix2seq(run: str | Path) -> tuple[Pix2Seq, dict, Pix2SeqOptions]:
    """A trained model from its run folder: (model in eval mode, meta, options)."""
    from ..engine.checkpoint import load_run_weights

    run = Path(run)
    if run.is_file():
        run = run.parent
    if not (run / OPTIONS_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a pix2seq run (no {OPTIONS_FILE})")
    meta = json.loads((run / OPTIONS_FILE).read_text())
    o = Pix2SeqOptions(**{f.name: meta["options"][f.name] for f in fields(Pix2SeqOptions) if f.name in meta["options"]})
    model = build_pix2seq(meta["backbone"], o, meta["img_size"], meta["in_chans"], taskset_from_meta(meta, o),
                          **meta.get("backbone_kwargs", {}))
    model.load_state_dict(load_run_weights(run))
    return model.eval(), meta, o


def evaluate_tasks(model: Pix2Seq, ts, data: CocoData, o: Pix2SeqOptions, size: int, in_chans: int = 3,
                   batch_size: int = 16, device=None, max_images: int | None = None,
                   predictions: dict | None = None, info=None) -> dict:
    """Every task of ``ts`` on ``data``, one flat dict: detection ``AP AP50 AP75``; segmentation ``segm_*``
    (prompted by ground-truth boxes) and ``segm_det_*`` (by the model's detections); keypoints ``kpt_*`` and
    ``kpt_det_*``; captioning ``BLEU4 CIDEr``. ``predictions`` (a dict) receives each task's results. ``info``
    (several processes, every one calling this): each decodes its share, the main process scores and returns
    the figures, the others ``{}``."""
    from .multitask import evaluate_captions, evaluate_instance_task

    out: dict = {}
    keep = ("AP", "AP50", "AP75")
    pred = predictions if predictions is not None else {}
    if "det" in ts.tasks:
        r, pred["det"] = evaluate_detection(model, data, o, size, in_chans, batch_size, device, max_images=max_images,
                                            info=info)
        out.update({k: r[k] for k in keep if k in r})
    for task, name in (("seg", "segm"), ("kpt", "kpt")):
        if task not in ts.tasks:
            continue
        for src in ("gt", "det") if "det" in ts.tasks else ("gt",):
            r, pred[f"{task}_{src}"] = evaluate_instance_task(task, model, ts, data, o, size, in_chans, batch_size,
                                                              device, boxes_from=src, max_images=max_images,
                                                              info=info)
            tag = name if src == "gt" else f"{name}_det"
            out.update({f"{tag}_{k}": r[k] for k in keep if k in r})
    if "cap" in ts.tasks:
        r, pred["cap"] = evaluate_captions(model, ts, data, o, size, in_chans, batch_size, device, max_images,
                                           info=info)
        out.update({k: r[k] for k in ("BLEU4", "CIDEr") if k in r})
    return out


def run_pix2seq_eval(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, batch_size: int = 16,
                     device: str = "auto") -> dict:
    """Every task the run was trained on, scored on COCO ``data`` (``evaluate_tasks``); writes ``eval.json`` and
    the predictions under ``out`` (default RUN/eval): ``predictions.json`` (detections, COCO results format
    with the data file's own ids) and one ``predictions_<task>.json`` per other task."""
    from ..engine import dist as D

    model, meta, o = load_pix2seq(checkpoint)
    ts = taskset_from_meta(meta, o)
    coco = load_coco(data)
    if coco.category_names != meta["categories"]:
        raise ValueError(f"{coco.path} has categories {coco.category_names[:5]}...; the model was trained on "
                         f"{meta['categories'][:5]}...")
    info = D.setup(device)
    model.to(info.device)
    preds: dict = {}
    res = evaluate_tasks(model, ts, coco, o, meta["img_size"], meta["in_chans"], batch_size, info.device,
                         predictions=preds)
    run = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out = Path(out) if out else run / RunDir.EVAL
    out.mkdir(parents=True, exist_ok=True)
    for key, rows in preds.items():
        name = RunDir.PREDICTIONS if key == "det" else f"predictions_{key}.json"
        rows = _to_file_ids(rows, coco) if key != "cap" else \
            [{**r, "image_id": coco.orig_image_ids[r["image_id"] - 1]} for r in rows]
        (out / name).write_text(json.dumps(rows))
    (out / RunDir.EVAL_JSON).write_text(json.dumps(res, indent=1))
    print("  ".join(f"{k} {v:.4f}" for k, v in res.items()) + f"  on {len(coco.gt['images'])} images "
          f"(tasks {','.join(ts.tasks)}); results: {out}")
    return res


PREDICT_TASKS = ("det", "seg", "kpt", "cap")


@torch.no_grad()
def run_pix2seq_predict(checkpoint: str | Path, images: str | Path, out: str | Path, draw: str | Path | None = None,
                        threshold: float = 0.3, device: str = "auto", task: str = "det") -> list[dict]:
    """Run one task on an image file or a folder; writes ``out`` (JSON rows per image) and, with ``draw``, one
    PNG. ``det``: boxes, classes, scores; ``seg``: a mask per detected object (8 samples averaged, as official);
    ``kpt``: keypoints per detected object (and skeleton lines where the data defined them); ``cap``: a caption.
    The instance tasks are prompted by the model's own detections scoring at least ``threshold``."""
    from ..data.datasets import decode_image
    from ..data.photos import IMAGE_SUFFIXES
    from ..engine import dist as D
    from .instance import ensemble_masks, rasterize_polygon
    from .metrics import mask_result
    from .multitask import prompted_instances

    model, meta, o = load_pix2seq(checkpoint)
    ts = taskset_from_meta(meta, o)
    if task not in PREDICT_TASKS:
        raise ValueError(f"--task {task!r}: use one of {', '.join(PREDICT_TASKS)}")
    if task not in ts.tasks:
        raise ValueError(f"{checkpoint} was trained on tasks {','.join(ts.tasks)}: it cannot answer --task {task}")
    if task in ("seg", "kpt") and "det" not in ts.tasks:
        raise ValueError(f"{checkpoint} has no detection task: --task {task} is prompted by the model's own boxes")
    src = Path(images)
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if src.is_dir() else [src]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no images at {src}")
    info = D.setup(device)
    model.to(info.device)
    size = meta["img_size"]
    tf = DetectionEvalTransform(size)
    gen = torch.Generator(device=info.device).manual_seed(0)
    rows, drawn = [], []
    for f in files:
        raw = decode_image(f, meta["in_chans"])
        img, t = tf(raw, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0})
        mem = model.encode(_normalize(img)[None].to(info.device))
        if task == "cap":
            prompt = torch.full((1, 1), TASK_TOKENS["captioning"], device=info.device)
            seq, _ = model.generate(None, prompt, ts.cap.seq_len, o.temperature, top_p=o.cap_top_p, memory=mem,
                                    generator=gen)
            text = ts.cap.decode(seq.cpu())[0]
            rows.append({"file_name": str(f), "caption": text})
            drawn.append((raw, [], text))
            continue
        prompt = torch.full((1, 1), TASK_TOKENS["detection"], device=info.device)
        seq, logits = model.generate(None, prompt, ts.det.seq_len, o.temperature, top_p=o.top_p, memory=mem)
        b, c, s = ts.det.decode(logits.cpu(), seq.cpu())
        dets = [d for d in detections_to_coco(b[0], c[0], s[0], 0, size, t["scale"], len(meta["categories"]))
                if d["score"] >= threshold]
        if task in ("seg", "kpt") and dets:
            sy, sx = t["scale"]
            yx = torch.tensor([[d["bbox"][1] * sy, d["bbox"][0] * sx, (d["bbox"][1] + d["bbox"][3]) * sy,
                                (d["bbox"][0] + d["bbox"][2]) * sx] for d in dets]) / size
            lab = torch.tensor([d["category_id"] for d in dets])
            n_s = o.seg_samples if task == "seg" else 1
            top_p = o.seg_top_p if task == "seg" else o.kpt_top_p
            resp, lg, _ = prompted_instances(ts, task, mem, [yx], [lab], model, n_s, top_p, o.temperature, gen)
            h, w = raw.shape[-2:]
            if task == "seg":
                parts = ts.seg.decode(resp)
                for i, d in enumerate(dets):
                    m = ensemble_masks(np.stack([rasterize_polygon([p * [size / sy, size / sx] for p in
                                                                    parts[i * n_s + j]], h, w) for j in range(n_s)]),
                                       o.seg_threshold)
                    d["mask"] = m
                    d["segmentation"] = mask_result(m, 0, 0, 0.0)["segmentation"]
            else:
                pts, ks = ts.kpt.decode(lg, resp, yx, o.temperature, top_p, generator=gen)
                for i, d in enumerate(dets):
                    d["keypoints"] = (pts[i].double() * torch.tensor([size / sy, size / sx]))[:, [1, 0]].tolist()
                    d["keypoint_score"] = float(ks[i])
        for d in dets:
            row = {"file_name": str(f), "category_id": meta["category_ids"][d["category_id"] - 1],
                   "category": meta["categories"][d["category_id"] - 1], "bbox": d["bbox"], "score": d["score"]}
            row.update({k: d[k] for k in ("segmentation", "keypoints", "keypoint_score") if k in d})
            rows.append(row)
        drawn.append((raw, dets, None))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    if draw:
        _draw(drawn, meta["categories"], Path(draw), meta.get("skeleton"))
    what = "captions" if task == "cap" else "objects"
    print(f"{len(rows)} {what} in {len(files)} image(s): {out}" + (f", picture: {draw}" if draw else ""))
    return rows


def _draw(items: list, names: list[str], path: Path, skeleton: list | None = None, max_images: int = 16) -> None:
    """Boxes, class names and scores on the images - and masks, keypoints (with skeleton lines) or the caption
    where the task gave them - tiled into one PNG (each image scaled to 256 px)."""
    from PIL import Image, ImageDraw

    tiles = []
    for raw, dets, caption in items[:max_images]:
        a = raw.permute(1, 2, 0).numpy()
        im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a[..., :3]).convert("RGB")
        k = 256 / max(im.size)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
        for det in dets:
            if "mask" in det:
                hue = (det["category_id"] * 67) % 255
                m = Image.fromarray((det["mask"] * 110).astype(np.uint8)).resize(im.size, Image.NEAREST)
                im = Image.composite(Image.new("RGB", im.size, (255, hue, 255 - hue)), im, m)
        d = ImageDraw.Draw(im)
        for det in dets:
            x, y, w, h = (v * k for v in det["bbox"])
            hue = (det["category_id"] * 67) % 255
            color = (255, hue, 255 - hue)
            d.rectangle([x, y, x + w, y + h], outline=color, width=1 if "keypoints" in det else 2)
            d.text((x + 2, max(0, y - 11)), f"{names[det['category_id'] - 1]} {det['score']:.2f}", fill=color)
            if "keypoints" in det:
                pts = [(px * k, py * k) for px, py in det["keypoints"]]
                for i, j in skeleton or []:  # COCO skeletons are 1-based index pairs
                    if 1 <= i <= len(pts) and 1 <= j <= len(pts):
                        d.line([pts[i - 1], pts[j - 1]], fill=(0, 255, 0), width=2)
                for px, py in pts:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(0, 255, 0), outline=(0, 0, 0))
        if caption is not None:  # every word: a caption cut short in the picture would misreport the model
            import textwrap

            lines = textwrap.wrap(caption or "(empty)", 42)
            canvas = Image.new("RGB", (im.width, im.height + 13 * len(lines) + 6), (255, 255, 255))
            canvas.paste(im, (0, 0))
            ImageDraw.Draw(canvas).multiline_text((3, im.height + 2), "\n".join(lines), fill=(0, 0, 0), spacing=3)
            im = canvas
        tiles.append(im)
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    th = max(t.height for t in tiles) + 4
    sheet = Image.new("RGB", (cols * 260, rows * th), (255, 255, 255))
    for i, im in enumerate(tiles):
        sheet.paste(im, ((i % cols) * 260 + 2, (i // cols) * th + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _train_arguments(p) -> None:
    add_config_flags(p, "pix2seq")  # pix2seq.* keys: --pix2seq.bins or --bins, pix2seq.bins=..., a recipe's pix2seq:
    p.add_argument("--backbone", dest="model.name", default=None, help="= model.name (any maskconv backbone)")
    p.add_argument("--val", default=None, help="COCO data scored (AP) after each evaluated epoch")


def _arguments(px) -> None:
    psub = px.add_subparsers(dest="what", required=True)
    _train_arguments(psub.add_parser("train", help="train on a COCO folder / JSON (--data), any --backbone"))
    pe = psub.add_parser("eval", help="score every task the run was trained on (AP; segm/keypoint AP; BLEU-4, "
                                      "CIDEr-D), predictions in COCO results format")
    pe.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pe.add_argument("--data", required=True, help="COCO folder (annotations.json + images) or JSON file")
    pe.add_argument("--out", default=None)
    pe.add_argument("--batch-size", type=int, default=16)
    pp = psub.add_parser("predict", help="run one task on images (boxes, masks, keypoints or a caption); JSON and "
                                         "an optional picture")
    pp.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pp.add_argument("--images", required=True, help="an image file or a folder")
    pp.add_argument("--out", required=True, help="JSON to write")
    pp.add_argument("--draw", default=None, help="PNG of the images with what the task wrote")
    pp.add_argument("--threshold", type=float, default=0.3, help="lowest detection score kept")
    pp.add_argument("--task", choices=PREDICT_TASKS, default="det",
                    help="det: boxes; seg: a mask per detected object; kpt: keypoints per detected object; cap: a "
                         "caption (the run must have been trained on it)")


def _cli(args) -> None:
    if args.what == "train":
        run_pix2seq_train(config_from_args(args), val=args.val)
    elif args.what == "eval":
        run_pix2seq_eval(args.checkpoint, args.data, args.out, args.batch_size)
    else:
        run_pix2seq_predict(args.checkpoint, args.images, args.out, args.draw, args.threshold, task=args.task)


COMMAND = Command("Pix2Seq on any backbone (COCO-format data): detection, and v2's instance segmentation, "
                  "keypoints and captioning from one model (--tasks)", _arguments, _cli)
