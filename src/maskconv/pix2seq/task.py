"""Pix2Seq detection behind ``maskconv pix2seq train | eval | predict``, through the one training loop.

The engine trains on ``(images, labels)`` batches: here each label is one row of tokens, the input sequence
followed by the target sequence (token weights are a function of the target, ``tokenizer.token_weights``), made
by ``Pix2SeqTrainTransform`` inside ``SeededDataset`` so noise boxes and crops are reproducible on resume.
A run folder holds the engine's files (``last.pt``, ``metrics.jsonl``, ``config.json``), ``pix2seq.json`` (the
options and classes needed to rebuild the model) and ``model.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..commands import Command, add_config_flags, config_from_args
from ..data.coco import CocoData, CocoDetection, DetectionEvalTransform, DetectionTrainTransform, coco_evaluate, load_coco
from .model import Pix2Seq
from .tokenizer import DetectionTokenizer
from .vocab import TASK_TOKENS, Vocab, default_bins

__all__ = ["Pix2SeqOptions", "build_pix2seq", "run_pix2seq_train", "run_pix2seq_eval", "run_pix2seq_predict",
           "evaluate_detection", "detections_to_coco", "Pix2SeqTrainTransform"]

OPTIONS_FILE = "pix2seq.json"


@dataclass
class Pix2SeqOptions:
    """Task settings beyond the engine's config (defaults: the official detection recipe, decoder of the R50
    variant: 6 x 256, 8 heads, MLP 1024)."""
    bins: int = 0  # 0 = default_bins(img_size): ~2 per pixel, at most 1000
    max_objects: int = 100  # sequence = 5 x max_objects tokens; noise boxes fill every free slot
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    drop: float = 0.1
    drop_path: float = 0.1
    jitter_min: float = 0.3
    jitter_max: float = 2.0
    noise: bool = True
    corruption: str = "rand_n_fake_cls"
    noise_bbox_weight: float = 1.0
    eos_token_weight: float = 0.1
    top_p: float = 0.4
    temperature: float = 1.0

    def __post_init__(self):
        from .tokenizer import CORRUPTIONS

        bad = [(ok, need) for ok, need in (
            (self.bins == 0 or self.bins >= 2, "bins: 0 (auto) or >= 2"), (self.max_objects >= 1, "max_objects >= 1"),
            (self.dim >= 1 and self.heads >= 1 and self.dim % self.heads == 0, "dim a multiple of heads"),
            (self.depth >= 1, "depth >= 1"), (0 < self.top_p <= 1, "top_p in (0, 1]"),
            (self.temperature > 0, "temperature > 0"), (0 < self.jitter_min <= self.jitter_max, "0 < jitter_min <= jitter_max"),
            (self.corruption in CORRUPTIONS, f"corruption one of {', '.join(CORRUPTIONS)}"),
            (0 <= self.drop < 1 and 0 <= self.drop_path < 1, "drop and drop_path in [0, 1)")) if not ok]
        if bad:
            raise ValueError(f"pix2seq options: need {bad[0][1]} ({self})")

    def resolved_bins(self, img_size: int) -> int:
        return self.bins or default_bins(img_size)


def _tokenizer(o: Pix2SeqOptions, img_size: int) -> DetectionTokenizer:
    return DetectionTokenizer(Vocab(o.resolved_bins(img_size)), o.max_objects, o.noise, o.corruption,
                              noise_bbox_weight=o.noise_bbox_weight, eos_token_weight=o.eos_token_weight)


def build_pix2seq(backbone: str, o: Pix2SeqOptions, img_size: int, in_chans: int = 3, **backbone_kwargs) -> Pix2Seq:
    from ..models import create_model

    if "vit" in backbone or "convmae" in backbone:
        backbone_kwargs.setdefault("img_size", img_size)
    enc = create_model(backbone, num_classes=0, in_chans=in_chans, **backbone_kwargs)
    vocab = _tokenizer(o, img_size).vocab
    return Pix2Seq(enc, vocab.size, 5 * o.max_objects, o.dim, o.depth, o.heads, o.mlp_ratio, o.drop, o.drop_path)


def _normalize(img: torch.Tensor) -> torch.Tensor:
    from ..data.photos import default_norm

    mean, std = default_norm(img.shape[-3])
    return (img - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _yxyx(boxes_xyxy: torch.Tensor, size: int) -> torch.Tensor:
    return boxes_xyxy[:, [1, 0, 3, 2]] / size


class Pix2SeqTrainTransform:
    """(uint8 image, COCO target) -> (normalized padded image, tokens (2L,) = input_seq ++ target_seq)."""
    joint = True

    def __init__(self, size: int, tok: DetectionTokenizer, jitter: tuple[float, float]):
        self.size, self.tok, self.image_tf = size, tok, DetectionTrainTransform(size, jitter)

    def __call__(self, img: torch.Tensor, target: dict):
        img, t = self.image_tf(img, target)
        inp, tgt = self.tok.encode(_yxyx(t["boxes"], self.size), t["labels"], train=True)
        return _normalize(img), torch.cat([inp, tgt])


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


def _eval_batches(data: CocoData, size: int, in_chans: int, batch_size: int):
    ds = CocoDetection(data, in_chans, train=False)
    tf = DetectionEvalTransform(size)
    batch = []
    for i in range(len(ds)):
        item = ds[i]
        if item is None:
            raise ValueError(f"{data.image_dir / ds.images[i]['file_name']}: the image cannot be decoded")
        img, t = tf(*item)
        batch.append((_normalize(img), t))
        if len(batch) == batch_size or i == len(ds) - 1:
            yield torch.stack([b[0] for b in batch]), [b[1] for b in batch]
            batch = []


@torch.no_grad()
def evaluate_detection(model: Pix2Seq, data: CocoData, o: Pix2SeqOptions, size: int, in_chans: int = 3,
                       batch_size: int = 16, device=None, oracle: bool = False) -> tuple[dict, list[dict]]:
    """COCO AP / AP50 / AP75 on ``data`` and the detections (remapped ids). ``oracle``: decode the ground truth
    (tokenized, one-hot logits) instead of the model's output - the pipeline's own ceiling, 1.0 up to bins."""
    tok = _tokenizer(o, size)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        device = device or next(model.parameters()).device
    dets: list[dict] = []
    for images, targets in _eval_batches(data, size, in_chans, batch_size):
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
    return coco_evaluate(data.gt, dets), dets


def _to_file_ids(dets: list[dict], data: CocoData) -> list[dict]:
    """Remapped ids -> the ids of the user's file (COCO results format against their own JSON)."""
    return [{**d, "image_id": data.orig_image_ids[d["image_id"] - 1],
             "category_id": data.orig_category_ids[d["category_id"] - 1]} for d in dets]


def run_pix2seq_train(cfg, o: Pix2SeqOptions | None = None, val: str | None = None):
    """Train Pix2Seq on the COCO data at ``cfg.data.path`` (backbone ``cfg.model.name``, encoder weights from
    ``cfg.model.init``); ``val``: COCO data scored (AP) after each evaluated epoch. Returns the ``FitResult``."""
    from ..engine import dist as D
    from ..engine.loop import fit
    from ..models import load_checkpoint, save_weights, stem_stride_kwarg

    o = o or Pix2SeqOptions()
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    size, in_chans = cfg.data.img_size, cfg.model.in_chans
    data = load_coco(cfg.data.path)
    if data.num_classes > Vocab().max_classes:
        raise ValueError(f"{data.path}: {data.num_classes} categories; the vocabulary holds {Vocab().max_classes}")
    out = Path(cfg.run.out)
    enc_kw = {stem_stride_kwarg(cfg.model.name): cfg.model.stem_stride} if cfg.model.stem_stride else {}
    meta = {"backbone": cfg.model.name, "backbone_kwargs": enc_kw, "img_size": size, "in_chans": in_chans,
            "options": asdict(o),
            "categories": data.category_names, "category_ids": data.orig_category_ids}
    if (out / OPTIONS_FILE).exists():  # resuming: the same task settings, or a clear refusal
        have = json.loads((out / OPTIONS_FILE).read_text())
        if have != json.loads(json.dumps(meta)):
            raise ValueError(f"{out / OPTIONS_FILE} was written with other settings or data; choose another --out")
    model = build_pix2seq(cfg.model.name, o, size, in_chans, drop_path_rate=cfg.model.drop_path_rate, **enc_kw)
    if cfg.model.init:
        rep = load_checkpoint(model.encoder, cfg.model.init, drop_mismatched_head=True)
        print(f"encoder init from {cfg.model.init} ({rep.layout} layout)")
    tok = _tokenizer(o, size)
    tf = Pix2SeqTrainTransform(size, tok, (o.jitter_min, o.jitter_max))
    val_data = load_coco(val) if val and info.is_main else None

    def loss_fn(m, x, y):
        inp, tgt = y.chunk(2, 1)  # (B, L) each
        logits = m(x, inp)  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="none")
        w = tok.weights(tgt).flatten()
        return (ce * w).sum() / (w.sum() + 1e-9)  # official: sum(w * l) / (sum(w) + 1e-9)

    def evaluate(m):
        if val_data is None:
            return {}
        r, _ = evaluate_detection(m, val_data, o, size, in_chans, cfg.data.batch_size, info.device)
        return {f"val_{k}": v for k, v in r.items() if k in ("AP", "AP50", "AP75")}

    res = fit(cfg, model, CocoDetection(data, in_chans, train=True), tf, loss_fn, task="pix2seq",
              evaluate=evaluate, info=info, files={OPTIONS_FILE: json.dumps(meta, indent=1)})  # written once locked
    if info.is_main:
        save_weights(res.state_dict if res.state_dict is not None else model, res.out / "model.safetensors",
                     metadata={"architecture": f"pix2seq:{cfg.model.name}"})
    res.run.release()
    return res


def load_pix2seq(run: str | Path) -> tuple[Pix2Seq, dict, Pix2SeqOptions]:
    """A trained model from its run folder: (model in eval mode, meta, options)."""
    from ..engine.checkpoint import LAST, load_training_checkpoint

    run = Path(run)
    if run.is_file():
        run = run.parent
    if not (run / OPTIONS_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a pix2seq run (no {OPTIONS_FILE})")
    meta = json.loads((run / OPTIONS_FILE).read_text())
    o = Pix2SeqOptions(**{f.name: meta["options"][f.name] for f in fields(Pix2SeqOptions) if f.name in meta["options"]})
    model = build_pix2seq(meta["backbone"], o, meta["img_size"], meta["in_chans"], **meta.get("backbone_kwargs", {}))
    if (run / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(run / "model.safetensors")
    elif (run / LAST).is_file():  # an unfinished run: its last checkpoint
        sd = load_training_checkpoint(run / LAST)["model"]
    else:
        raise FileNotFoundError(f"{run} holds neither model.safetensors nor {LAST}")
    model.load_state_dict(sd)
    return model.eval(), meta, o


def run_pix2seq_eval(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, batch_size: int = 16,
                     device: str = "auto") -> dict:
    """COCO AP / AP50 / AP75 of a run on COCO ``data``; writes ``eval.json`` and the detections (COCO results
    format, the data file's own ids) as ``predictions.json`` under ``out`` (default RUN/eval)."""
    from ..engine import dist as D

    model, meta, o = load_pix2seq(checkpoint)
    coco = load_coco(data)
    if coco.category_names != meta["categories"]:
        raise ValueError(f"{coco.path} has categories {coco.category_names[:5]}...; the model was trained on "
                         f"{meta['categories'][:5]}...")
    info = D.setup(device)
    model.to(info.device)
    res, dets = evaluate_detection(model, coco, o, meta["img_size"], meta["in_chans"], batch_size, info.device)
    run = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out = Path(out) if out else run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(_to_file_ids(dets, coco)))
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    print(f"AP {res['AP']:.4f}  AP50 {res['AP50']:.4f}  AP75 {res['AP75']:.4f}  on {len(coco.gt['images'])} images; "
          f"predictions: {out / 'predictions.json'}")
    return res


def run_pix2seq_predict(checkpoint: str | Path, images: str | Path, out: str | Path, draw: str | Path | None = None,
                        threshold: float = 0.3, device: str = "auto") -> list[dict]:
    """Detect objects in an image file or a folder; writes ``out`` (JSON: file, category, bbox xywh, score) and,
    with ``draw``, one PNG of the images with their boxes, classes and scores."""
    from ..data.datasets import decode_image
    from ..data.photos import IMAGE_SUFFIXES
    from ..engine import dist as D

    model, meta, o = load_pix2seq(checkpoint)
    src = Path(images)
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if src.is_dir() else [src]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no images at {src}")
    info = D.setup(device)
    model.to(info.device)
    size, tok = meta["img_size"], _tokenizer(o, meta["img_size"])
    tf = DetectionEvalTransform(size)
    rows, drawn = [], []
    for f in files:
        raw = decode_image(f, meta["in_chans"])
        img, t = tf(raw, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0})
        prompt = torch.full((1, 1), TASK_TOKENS["detection"], device=info.device)
        seq, logits = model.generate(_normalize(img)[None].to(info.device), prompt, tok.seq_len, o.temperature,
                                     top_p=o.top_p)
        b, c, s = tok.decode(logits.cpu(), seq.cpu())
        dets = [d for d in detections_to_coco(b[0], c[0], s[0], 0, size, t["scale"], len(meta["categories"]))
                if d["score"] >= threshold]
        for d in dets:
            rows.append({"file_name": str(f), "category_id": meta["category_ids"][d["category_id"] - 1],
                         "category": meta["categories"][d["category_id"] - 1], "bbox": d["bbox"], "score": d["score"]})
        drawn.append((raw, dets))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    if draw:
        _draw(drawn, meta["categories"], Path(draw))
    print(f"{len(rows)} objects in {len(files)} image(s): {out}" + (f", picture: {draw}" if draw else ""))
    return rows


def _draw(items: list, names: list[str], path: Path, max_images: int = 16) -> None:
    """Boxes, class names and scores on the images, tiled into one PNG (each image scaled to 256 px)."""
    from PIL import Image, ImageDraw

    tiles = []
    for raw, dets in items[:max_images]:
        a = raw.permute(1, 2, 0).numpy()
        im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a[..., :3]).convert("RGB")
        k = 256 / max(im.size)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for det in dets:
            x, y, w, h = (v * k for v in det["bbox"])
            hue = (det["category_id"] * 67) % 255
            color = (255, hue, 255 - hue)
            d.rectangle([x, y, x + w, y + h], outline=color, width=2)
            d.text((x + 2, max(0, y - 11)), f"{names[det['category_id'] - 1]} {det['score']:.2f}", fill=color)
        tiles.append(im)
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * 260, rows * 260), (255, 255, 255))
    for i, im in enumerate(tiles):
        sheet.paste(im, ((i % cols) * 260 + 2, (i // cols) * 260 + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _train_arguments(p) -> None:
    add_config_flags(p, "pix2seq")
    p.add_argument("--backbone", dest="model.name", default=None, help="= model.name (any maskconv backbone)")
    p.add_argument("--val", default=None, help="COCO data scored (AP) after each evaluated epoch")
    for f in fields(Pix2SeqOptions):
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes")}.get(f.type, None) or \
            {"int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"p2s_{f.name}", type=kind, default=None,
                       metavar="V", help=f"pix2seq, default {f.default!r}")


def _arguments(px) -> None:
    psub = px.add_subparsers(dest="what", required=True)
    _train_arguments(psub.add_parser("train", help="train on a COCO folder / JSON (--data), any --backbone"))
    pe = psub.add_parser("eval", help="COCO AP / AP50 / AP75 of a run, predictions in COCO results format")
    pe.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pe.add_argument("--data", required=True, help="COCO folder (annotations.json + images) or JSON file")
    pe.add_argument("--out", default=None)
    pe.add_argument("--batch-size", type=int, default=16)
    pp = psub.add_parser("predict", help="detect objects in images; JSON and an optional picture")
    pp.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pp.add_argument("--images", required=True, help="an image file or a folder")
    pp.add_argument("--out", required=True, help="JSON to write")
    pp.add_argument("--draw", default=None, help="PNG of the images with boxes, classes and scores")
    pp.add_argument("--threshold", type=float, default=0.3, help="lowest score kept")


def _cli(args) -> None:
    if args.what == "train":
        opts = Pix2SeqOptions(**{k[4:]: v for k, v in vars(args).items() if k.startswith("p2s_") and v is not None})
        run_pix2seq_train(config_from_args(args), opts, args.val)
    elif args.what == "eval":
        run_pix2seq_eval(args.checkpoint, args.data, args.out, args.batch_size)
    else:
        run_pix2seq_predict(args.checkpoint, args.images, args.out, args.draw, args.threshold)


COMMAND = Command("Pix2Seq object detection on any backbone (COCO-format data)", _arguments, _cli)
