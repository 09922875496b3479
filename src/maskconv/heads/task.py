"""Dense transfer behind ``maskconv detect|segment train | eval | predict``, through the one training loop.

* detect: torchvision's Mask R-CNN (``DenseOptions.masks``) or Faster R-CNN (``heads/detection.py``) on COCO
  instance data (``data/coco.py``: the scenes benchmark, ``maskconv scenes``, is the documented default); box AP
  and mask AP by pycocotools (``coco_evaluate``).
* segment: UperNet (``heads/segmentation.py``) on COCO polygons (class map: 0 = background, category k = k, crowd
  regions ignored) or a folder of PNG label maps (``images/`` + ``labels/`` with the same stems, pixel = class,
  255 = ignore, optional ``classes.txt``); mIoU and per-class IoU.

A run folder holds the engine's files (``last.pt``, ``metrics.jsonl``, ``config.json``), ``dense.json`` (what
rebuilds the model: backbone, options, classes) and ``model.safetensors``. Training images go through the
Pix2Seq pipeline's box- and mask-aware transform (scale jitter, crop, flip, pad: ``DetectionTrainTransform``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.coco import IGNORE_INDEX, CocoData, CocoDetection, DetectionTrainTransform, check_evaluable, coco_evaluate, load_coco
from ..engine.rundir import RunDir

__all__ = ["DenseOptions", "run_detect_train", "run_detect_eval", "run_detect_predict", "run_segment_train",
           "run_segment_eval", "run_segment_predict", "evaluate_instances", "evaluate_segmentation",
           "instances_to_coco", "load_dense", "SemanticMaps", "load_segmentation_data"]

META_FILE = RunDir.DENSE


@dataclass
class DenseOptions:
    """Head settings beyond the engine's config."""
    masks: bool = True  # detect: Mask R-CNN (True) or Faster R-CNN (False)
    anchor_size: int = 32  # detect: anchor side on the finest level, x2 per level (torchvision: 32)
    fpn_dim: int = 256  # detect: FPN width
    head_dim: int = 256  # detect: mask head convs (box head MLP: 4x), torchvision's 256
    proposals: int = 2000  # detect: RPN proposals kept in training (half at test), torchvision's 2000
    roi_samples: int = 512  # detect: ROIs sampled per image for the box loss, torchvision's 512
    channels: int = 512  # segment: UperNet width (the ADE20K protocol's 512)
    jitter_min: float = 0.5  # scale jitter of the training transform (of data.img_size)
    jitter_max: float = 1.5
    hflip: bool = True

    def __post_init__(self):
        bad = [need for ok, need in ((self.anchor_size >= 1, "anchor_size >= 1"), (self.fpn_dim >= 1, "fpn_dim >= 1"),
                                     (min(self.head_dim, self.proposals, self.roi_samples) >= 1,
                                      "head_dim, proposals and roi_samples >= 1"),
                                     (self.channels >= 1, "channels >= 1"),
                                     (0 < self.jitter_min <= self.jitter_max, "0 < jitter_min <= jitter_max")) if not ok]
        if bad:
            raise ValueError(f"detect/segment options: need {bad[0]} ({self})")


def _normalize(img: torch.Tensor) -> torch.Tensor:  # (C, H, W) in [0, 1] -> the backbones' normalisation
    from ..data.photos import default_norm

    mean, std = default_norm(img.shape[-3])
    return (img - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


# ---- data ------------------------------------------------------------------------------------------------------
class DetectTrainTransform:
    """(uint8 image, COCO target with masks) -> (image (C, S, S) in [0, 1], target): torchvision's detectors
    normalise themselves."""
    joint = True

    def __init__(self, size: int, o: DenseOptions):
        self.tf = DetectionTrainTransform(size, (o.jitter_min, o.jitter_max), hflip=o.hflip)

    def __call__(self, img, target):
        img, t = self.tf(img, target)
        return img, {k: t[k] for k in ("boxes", "labels", "masks") if k in t}


class SegmentTrainTransform:
    """(uint8 image, {"semantic": (H, W)}) -> (normalised image (C, S, S), class map (S, S) long)."""
    joint = True

    def __init__(self, size: int, o: DenseOptions):
        self.tf = DetectionTrainTransform(size, (o.jitter_min, o.jitter_max), hflip=o.hflip)

    def __call__(self, img, target):
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        img, t = self.tf(img, {**empty, "semantic": target["semantic"]})
        return _normalize(img), t["semantic"].long()


def semantic_from_instances(target: dict, crowd: list[bool] | None = None) -> torch.Tensor:
    """(H, W) class map from instance masks: 0 background, later objects painted over earlier ones (the scenes'
    paste order), crowd regions ``IGNORE_INDEX``."""
    masks = target["masks"]
    out = torch.zeros(masks.shape[-2:], dtype=torch.long)
    for k, (m, c) in enumerate(zip(masks, target["labels"].tolist())):
        out[m.bool()] = IGNORE_INDEX if crowd and crowd[k] else c
    return out


class SemanticMaps(Dataset):
    """``(uint8 image, {"semantic": (H, W) long})`` per image, from COCO polygons or a PNG label-map folder.
    ``classes``: the class names, index = pixel value."""

    def __init__(self, root: str | Path, in_chans: int = 3):
        root = Path(root)
        self.in_chans = in_chans
        self.coco: CocoData | None = None
        if (root / "labels").is_dir() and (root / "images").is_dir():
            from ..data.photos import IMAGE_SUFFIXES

            labels = {p.stem: p for p in (root / "labels").glob("*.png")}
            self.files = sorted((p, labels[p.stem]) for p in (root / "images").iterdir()
                                if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels)
            if not self.files:
                raise FileNotFoundError(f"{root}: no image in images/ has a label map labels/<same stem>.png")
            names = root / "classes.txt"
            if names.is_file():
                self.classes = [x.strip() for x in names.read_text().splitlines() if x.strip()]
            else:  # every value the maps use, 255 aside
                top = max(int(v) for _, lab in self.files for v in self._label(lab).unique() if v != IGNORE_INDEX)
                self.classes = [f"class_{i}" for i in range(top + 1)]
            self.path = root
        else:
            self.coco = load_coco(root)
            self.base = CocoDetection(self.coco, in_chans, train=False, masks=True)
            self.classes = ["background", *self.coco.category_names]
            self.path = self.coco.path

    @staticmethod
    def _label(path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{path}: a label map must be a single-channel PNG (mode L or P), not {im.mode}")
            return torch.from_numpy(np.asarray(im).astype(np.int64))

    def __len__(self) -> int:
        return len(self.files) if self.coco is None else len(self.base)

    def __getitem__(self, i: int):
        from ..data.datasets import decode_image

        if self.coco is not None:
            item = self.base[i]
            if item is None:
                return None
            img, t = item
            crowd = [bool(a["iscrowd"]) for a in self.base.objects[i]]
            return img, {"semantic": semantic_from_instances(t, crowd)}
        img_path, lab_path = self.files[i]
        try:
            img = decode_image(img_path, self.in_chans)
        except Exception:
            return None
        lab = self._label(lab_path)
        if lab.shape != img.shape[-2:]:
            raise ValueError(f"{lab_path}: label map {tuple(lab.shape)} and image {tuple(img.shape[-2:])} differ in size")
        return img, {"semantic": lab}


def load_segmentation_data(root, in_chans: int = 3) -> SemanticMaps:
    return SemanticMaps(root, in_chans)


# ---- run folders -----------------------------------------------------------------------------------------------
def _build(meta: dict, o: DenseOptions, pretrained: str | None = None, **extra):
    from .detection import build_detector
    from .segmentation import build_segmenter

    kw = {**meta.get("backbone_kwargs", {}), **extra}
    if meta["task"] == "detect":
        return build_detector(meta["backbone"], len(meta["categories"]), o.masks, meta["img_size"], meta["in_chans"],
                              o.anchor_size, o.fpn_dim, pretrained, head_dim=o.head_dim, proposals=o.proposals,
                              roi_samples=o.roi_samples, **kw)
    return build_segmenter(meta["backbone"], len(meta["categories"]), meta["img_size"], meta["in_chans"], o.channels,
                           pretrained, **kw)


def _start(cfg, task: str, o: DenseOptions, categories: list[str], category_ids: list | None):
    from ..models import architecture_kwargs

    out = Path(cfg.run.out)
    kw = architecture_kwargs(cfg.model.name, cfg.model.stem_stride, cfg.model.width_mult)
    meta = {"task": task, "backbone": cfg.model.name, "backbone_kwargs": kw, "img_size": cfg.data.img_size,
            "in_chans": cfg.model.in_chans, "options": asdict(o), "categories": categories,
            "category_ids": category_ids}
    if (out / META_FILE).exists():  # resuming: the same task settings, or a clear refusal
        if json.loads((out / META_FILE).read_text()) != json.loads(json.dumps(meta)):
            raise ValueError(f"{out / META_FILE} was written with other settings or data; choose another --out")
    model = _build(meta, o, cfg.model.init or None, drop_path_rate=cfg.model.drop_path_rate)
    return meta, model


def _finish(res, info, task: str, backbone: str):
    from ..models import save_weights

    if info.is_main:
        save_weights(res.state_dict if res.state_dict is not None else res.model, res.out / RunDir.MODEL,
                     metadata={"architecture": f"{task}:{backbone}"})
    res.run.release()
    return res


def load_dense(run: str | Path, task: str | None = None):
    """A trained detector / segmenter from its run folder: (model in eval mode, meta, options); ``task``
    ('detect' / 'segment'): the run must be of that task."""
    from ..engine.checkpoint import load_run_weights

    run = Path(run)
    if run.is_file():
        run = run.parent
    if not (run / META_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a detect / segment run (no {META_FILE})")
    meta = json.loads((run / META_FILE).read_text())
    if task is not None and meta["task"] != task:
        raise ValueError(f"{run} is a {meta['task']} run, not a {task} run")
    o = DenseOptions(**{f.name: meta["options"][f.name] for f in fields(DenseOptions) if f.name in meta["options"]})
    model = _build(meta, o)
    model.load_state_dict(load_run_weights(run))
    return model.eval(), meta, o


def _run_of(checkpoint) -> Path:
    return Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent


# ---- detection -------------------------------------------------------------------------------------------------
def instances_to_coco(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, image_id: int,
                      masks: torch.Tensor | None = None, mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections (xyxy px, labels 1..K, scores, masks (N, [1,] H, W) probabilities or 0/1) -> COCO
    results (bbox xywh; ``segmentation`` as RLE when masks are given)."""
    rles = None
    if masks is not None:
        import numpy as np
        from pycocotools import mask as mask_utils

        m = masks.reshape(len(masks), *masks.shape[-2:]) > mask_threshold  # (N, H, W) bool
        rles = mask_utils.encode(np.asfortranarray(m.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    out = []
    for k, ((x0, y0, x1, y1), c, s) in enumerate(zip(boxes.tolist(), labels.tolist(), scores.tolist())):
        d = {"image_id": int(image_id), "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)}
        if rles is not None:
            d["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        out.append(d)
    return out


def _images(data: CocoData, in_chans: int, batch_size: int, masks: bool = False, info=None):
    """Batches (images, targets) of ``data``; ``info``: this process's share only (``dist.eval_share``)."""
    from ..engine import dist as D

    ds = CocoDetection(data, in_chans, train=False, masks=masks)
    share = D.eval_share(len(ds), info) if info is not None else range(len(ds))
    batch = []
    for i in share:
        item = ds[i]
        if item is None:
            raise ValueError(f"{data.image_dir / ds.images[i]['file_name']}: the image cannot be decoded")
        batch.append((item[0].float() / 255, item[1]))
        if len(batch) == batch_size or i == share[-1]:
            yield [b[0] for b in batch], [b[1] for b in batch]
            batch = []


@torch.no_grad()
def evaluate_instances(model, data: CocoData, in_chans: int = 3, batch_size: int = 8, device=None,
                       oracle: bool = False, info=None, lockstep: bool = False) -> tuple[dict, list[dict]]:
    """Box AP / AP50 / AP75 (and ``mask_AP*`` for Mask R-CNN) on ``data``, and the detections (remapped ids).
    ``oracle``: the ground truth itself as the predictions (score 1), through the same conversion and scoring:
    the pipeline's ceiling, 1.0. ``info`` (several processes, every one calling this): each detects on its
    share of the images, the detections are gathered to the main process (in the one-process order) and scored
    there; the other processes return ``({}, [])``. ``lockstep``: FSDP-sharded model (``dist.in_lockstep``)."""
    from ..engine import dist as D

    info = info or D.DistInfo()
    masks = oracle or getattr(getattr(model, "roi_heads", None), "has_mask", lambda: False)()
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        device = device or next(model.parameters()).device
    dets: list[dict] = []
    batches = _images(data, in_chans, batch_size, masks=oracle, info=info)
    if lockstep and info.world > 1 and not oracle:
        steps = D.in_lockstep(batches, info, lambda b: tuple(b[0][0].shape))
    else:
        steps = ((b, None) for b in batches)
    for batch, shape in steps:
        if batch is None:  # this process's images have ended: a forward all the same (FSDP), discarded
            model([torch.zeros(shape, device=device)])
            continue
        images, targets = batch
        if oracle:
            outs = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                     "masks": t["masks"]} for t in targets]
        else:
            outs = model([im.to(device) for im in images])
        for o, t in zip(outs, targets):
            dets += instances_to_coco(o["boxes"].cpu(), o["labels"].cpu(), o["scores"].cpu(), t["image_id"],
                                      o["masks"].cpu() if masks else None)
    if model is not None and was_training:
        model.train()
    parts = D.gather_to_main(dets, info)
    if parts is None:
        return {}, []
    dets = [d for part in parts for d in part]
    res = {k: v for k, v in coco_evaluate(data.gt, dets).items() if k != "detections"}
    if masks:
        res.update({f"mask_{k}": v for k, v in coco_evaluate(data.gt, dets, iou_type="segm").items()
                    if k != "detections"})
    return {**res, "detections": len(dets)}, dets


def run_detect_train(cfg, o: DenseOptions | None = None, val: str | None = None):
    """Train Mask R-CNN / Faster R-CNN on the COCO data at ``cfg.data.path`` (backbone ``cfg.model.name``,
    backbone weights from ``cfg.model.init``; layer-wise lr decay ``optim.layer_decay``); ``val``: COCO data
    scored after each evaluated epoch. Returns the ``FitResult``."""
    from ..engine import dist as D
    from ..engine.loop import fit

    o = o or DenseOptions()
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    data = load_coco(cfg.data.path)
    if o.masks:  # before any work: Mask R-CNN needs every training object's region
        bare = next((a for a in data.gt["annotations"] if not a.get("segmentation") and not a["iscrowd"]), None)
        if bare is not None:
            raise ValueError(f"{data.path}: annotations[{bare['id'] - 1}] has no 'segmentation'; Mask R-CNN needs "
                             "polygons or RLE: train boxes only with --masks false (Faster R-CNN)")
    meta, model = _start(cfg, "detect", o, data.category_names, data.orig_category_ids)
    val_data = load_coco(val) if val else None  # every process detects on its share
    lockstep = cfg.run.fsdp and info.world > 1
    if val_data is not None:  # before any work: mask AP reads every val object's region
        for iou in ("bbox", "segm") if o.masks else ("bbox",):
            check_evaluable(val_data.gt, iou, val_data.path)

    def loss_fn(m, x, targets):
        return sum((m(list(x), targets)).values())

    def evaluate(m):
        if val_data is None:
            return {}
        r, _ = evaluate_instances(m, val_data, cfg.model.in_chans, cfg.data.batch_size, info.device, info=info,
                                  lockstep=lockstep)
        return {f"val_{k}": v for k, v in r.items() if k != "detections"}

    res = fit(cfg, model, CocoDetection(data, cfg.model.in_chans, train=True, masks=o.masks),
              DetectTrainTransform(cfg.data.img_size, o), loss_fn, task="detect", evaluate=evaluate, info=info,
              files={META_FILE: json.dumps(meta, indent=1)})
    return _finish(res, info, "detect", cfg.model.name)


def run_detect_eval(checkpoint, data, out=None, batch_size: int = 8, device: str = "auto") -> dict:
    """Box (and mask) AP of a detect run on COCO ``data``; writes ``eval.json`` and ``predictions.json`` (COCO
    results format, the data file's own ids) under ``out`` (default RUN/eval)."""
    from ..engine import dist as D

    model, meta, _ = load_dense(checkpoint, "detect")
    coco = load_coco(data)
    _same_classes(coco.category_names, meta)
    info = D.setup(device)
    model.to(info.device)
    res, dets = evaluate_instances(model, coco, meta["in_chans"], batch_size, info.device)
    out = Path(out) if out else _run_of(checkpoint) / RunDir.EVAL
    out.mkdir(parents=True, exist_ok=True)
    (out / RunDir.PREDICTIONS).write_text(json.dumps(
        [{**d, "image_id": coco.orig_image_ids[d["image_id"] - 1],
          "category_id": coco.orig_category_ids[d["category_id"] - 1]} for d in dets]))
    (out / RunDir.EVAL_JSON).write_text(json.dumps(res, indent=1))
    msg = f"box AP {res['AP']:.4f} AP50 {res['AP50']:.4f} AP75 {res['AP75']:.4f}"
    if "mask_AP" in res:
        msg += f"; mask AP {res['mask_AP']:.4f} AP50 {res['mask_AP50']:.4f} AP75 {res['mask_AP75']:.4f}"
    print(f"{msg} on {len(coco.gt['images'])} images; predictions: {out / 'predictions.json'}")
    return res


def _same_classes(names: list[str], meta: dict) -> None:
    have = meta["categories"] if meta["task"] == "detect" else meta["categories"][1:]
    if names != have:
        raise ValueError(f"the data has classes {names[:5]}...; the model was trained on {have[:5]}...")


def _image_files(images) -> list[Path]:
    from ..data.photos import IMAGE_SUFFIXES

    src = Path(images)
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if src.is_dir() else [src]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no images at {src}")
    return files


@torch.no_grad()
def run_detect_predict(checkpoint, images, out, draw=None, threshold: float = 0.5, device: str = "auto") -> list[dict]:
    """Detect objects in an image file or a folder; writes ``out`` (JSON: file, category, bbox xywh, score) and,
    with ``draw``, one PNG of the images with their boxes, masks, classes and scores."""
    from ..data.datasets import decode_image
    from ..engine import dist as D

    model, meta, _ = load_dense(checkpoint, "detect")
    info = D.setup(device)
    model.to(info.device)
    rows, drawn = [], []
    for f in _image_files(images):
        raw = decode_image(f, meta["in_chans"])
        o = model([raw.float().div(255).to(info.device)])[0]
        keep = o["scores"] >= threshold
        o = {k: v[keep].cpu() for k, v in o.items()}
        for b, c, s in zip(o["boxes"].tolist(), o["labels"].tolist(), o["scores"].tolist()):
            rows.append({"file_name": str(f), "category_id": meta["category_ids"][c - 1],
                         "category": meta["categories"][c - 1], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s})
        drawn.append((raw, o))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    if draw:
        from .draw import draw_instances

        draw_instances(drawn, meta["categories"], Path(draw))
    print(f"{len(rows)} objects in {len(drawn)} image(s): {out}" + (f", picture: {draw}" if draw else ""))
    return rows


# ---- segmentation ----------------------------------------------------------------------------------------------
def _resize_long(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) float -> the longer side at ``size``, aspect kept (the model pads to its stride itself)."""
    h, w = img.shape[-2:]
    s = size / max(h, w)
    return F.interpolate(img[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         align_corners=False, antialias=True)[0]


@torch.no_grad()
def predict_classes(model, raw: torch.Tensor, size: int, device) -> torch.Tensor:
    """uint8 image (C, H, W) -> class map (H, W) at its own size (logits upsampled from the ``size`` input)."""
    x = _normalize(_resize_long(raw.float() / 255, size))
    logits = model(x[None].to(device))  # (1, K, h, w)
    return F.interpolate(logits, size=raw.shape[-2:], mode="bilinear", align_corners=False)[0].argmax(0).cpu()


@torch.no_grad()
def evaluate_segmentation(model, data: SemanticMaps, size: int, device=None, oracle: bool = False, info=None,
                          lockstep: bool = False) -> dict:
    """mIoU, pixel accuracy and per-class IoU of ``model`` on ``data`` at the labels' own resolution;
    ``oracle``: the label maps as the predictions (1.0). ``info`` (several processes, every one calling this):
    each scores its share of the images and the pixel confusion matrices are summed (the one-process figures
    on every process). ``lockstep``: FSDP-sharded model (``dist.in_lockstep``)."""
    from ..engine import dist as D
    from .segmentation import SegmentationMetric

    info = info or D.DistInfo()
    metric = SegmentationMetric(len(data.classes), IGNORE_INDEX)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        device = device or next(model.parameters()).device
    share = D.eval_share(len(data), info)
    steps = ((i, ()) for i in share)
    if lockstep and info.world > 1 and not oracle:
        steps = D.in_lockstep(share, info, lambda i: ())
    for i, _ in steps:
        if i is None:  # this process's images have ended: a forward all the same (FSDP), discarded
            model(torch.zeros(1, data.in_chans, size, size, device=device))
            continue
        item = data[i]
        if item is None:
            raise ValueError(f"{data.path}: image {i} cannot be decoded")
        raw, t = item
        label = t["semantic"]
        pred = label.clone() if oracle else predict_classes(model, raw, size, device)
        if oracle:
            pred[pred == IGNORE_INDEX] = 0
        metric.update(pred, label)
    if model is not None and was_training:
        model.train()
    metric.confusion = D.sum_across(metric.confusion, info)
    res = metric.compute()
    res["per_class_IoU"] = dict(zip(data.classes, res["per_class_IoU"]))
    return {**res, "images": len(data)}  # every image, each scored by one process


def run_segment_train(cfg, o: DenseOptions | None = None, val: str | None = None):
    """Train UperNet on ``cfg.data.path`` (COCO polygons or a PNG label-map folder); ``val``: data scored (mIoU)
    after each evaluated epoch. Returns the ``FitResult``."""
    from ..engine import dist as D
    from ..engine.loop import fit

    o = o or DenseOptions()
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    data = SemanticMaps(cfg.data.path, cfg.model.in_chans)
    meta, model = _start(cfg, "segment", o, data.classes, data.coco.orig_category_ids if data.coco else None)
    val_data = SemanticMaps(val, cfg.model.in_chans) if val else None  # every process scores its share
    lockstep = cfg.run.fsdp and info.world > 1

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x).float(), y, ignore_index=IGNORE_INDEX)

    def evaluate(m):
        if val_data is None:
            return {}
        r = evaluate_segmentation(m, val_data, cfg.data.img_size, info.device, info=info, lockstep=lockstep)
        return {"val_mIoU": r["mIoU"], "val_pixel_acc": r["pixel_acc"]}

    res = fit(cfg, model, data, SegmentTrainTransform(cfg.data.img_size, o), loss_fn, task="segment",
              evaluate=evaluate, info=info, files={META_FILE: json.dumps(meta, indent=1)})
    return _finish(res, info, "segment", cfg.model.name)


def run_segment_eval(checkpoint, data, out=None, device: str = "auto") -> dict:
    """mIoU and per-class IoU of a segment run on ``data``; writes ``eval.json`` under ``out`` (default RUN/eval)."""
    from ..engine import dist as D

    model, meta, _ = load_dense(checkpoint, "segment")
    ds = SemanticMaps(data, meta["in_chans"])
    if ds.classes != meta["categories"]:
        raise ValueError(f"{ds.path} has classes {ds.classes[:5]}...; the model was trained on {meta['categories'][:5]}...")
    info = D.setup(device)
    model.to(info.device)
    res = evaluate_segmentation(model, ds, meta["img_size"], info.device)
    out = Path(out) if out else _run_of(checkpoint) / RunDir.EVAL
    out.mkdir(parents=True, exist_ok=True)
    (out / RunDir.EVAL_JSON).write_text(json.dumps(res, indent=1))
    worst = sorted((v, k) for k, v in res["per_class_IoU"].items() if v is not None)[:3]
    print(f"mIoU {res['mIoU']:.4f}  pixel acc {res['pixel_acc']:.4f} on {res['images']} images; lowest IoU: "
          + ", ".join(f"{k} {v:.3f}" for v, k in worst) + f"; {out / 'eval.json'}")
    return res


def run_segment_predict(checkpoint, images, out, draw=None, device: str = "auto") -> list[dict]:
    """Class maps of an image file or a folder, written as PNG label maps into the folder ``out`` (pixel = class),
    and with ``draw`` one PNG of the images with their maps overlaid."""
    from ..data.datasets import decode_image
    from ..engine import dist as D

    model, meta, _ = load_dense(checkpoint, "segment")
    info = D.setup(device)
    model.to(info.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, drawn = [], []
    from PIL import Image

    for f in _image_files(images):
        raw = decode_image(f, meta["in_chans"])
        pred = predict_classes(model, raw, meta["img_size"], info.device)
        Image.fromarray(pred.to(torch.uint8).numpy(), mode="L").save(out / f"{f.stem}.png")
        counts = torch.bincount(pred.flatten(), minlength=len(meta["categories"]))
        rows.append({"file_name": str(f), "label_map": str(out / f"{f.stem}.png"),
                     "classes": {meta["categories"][c]: int(n) for c, n in enumerate(counts.tolist()) if n}})
        drawn.append((raw, pred))
    (out / RunDir.PREDICTIONS).write_text(json.dumps(rows, indent=1))
    if draw:
        from .draw import draw_semantic

        draw_semantic(drawn, meta["categories"], Path(draw))
    print(f"{len(rows)} label map(s) in {out}" + (f", picture: {draw}" if draw else ""))
    return rows


# ---- the CLI: maskconv detect | segment  train | eval | predict (rooms of cli.COMMANDS) -------------------------
def _bool_flag(v: str) -> bool:
    """``--masks flase`` is an error (argparse names the flag), never a silent False."""
    import argparse

    from ..config import ConfigError, parse_bool

    try:
        return parse_bool(v)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _option_arguments(p) -> None:
    for f in fields(DenseOptions):
        kind = {"bool": _bool_flag, "int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"dense_{f.name}", type=kind, default=None, metavar="V",
                       help=f"{f.name}, default {f.default!r}")


def _options(args) -> DenseOptions:
    return DenseOptions(**{k[6:]: v for k, v in vars(args).items() if k.startswith("dense_") and v is not None})


def _arguments(task: str):
    from ..commands import add_config_flags

    data = ("COCO folder (annotations.json + images) or JSON" if task == "detect" else
            "COCO folder / JSON (polygons) or a folder with images/ + labels/ (PNG label maps)")

    def add(px) -> None:
        psub = px.add_subparsers(dest="what", required=True)
        pt = psub.add_parser("train", help=f"train on --data ({data}), any --backbone; the scenes benchmark "
                                           "(`maskconv scenes`) is the documented default")
        add_config_flags(pt, task)
        pt.add_argument("--backbone", dest="model.name", default=None, help="= model.name (any maskconv backbone)")
        pt.add_argument("--val", default=None, help="data scored after each evaluated epoch")
        _option_arguments(pt)
        pe = psub.add_parser("eval", help="box / mask AP of a run (predictions in COCO results format)" if task ==
                             "detect" else "mIoU and per-class IoU of a run")
        pe.add_argument("--checkpoint", required=True, help=f"a {task} run folder")
        pe.add_argument("--data", required=True, help=data)
        pe.add_argument("--out", default=None, help="folder for eval.json (default RUN/eval)")
        if task == "detect":
            pe.add_argument("--batch-size", type=int, default=8)
        pp = psub.add_parser("predict", help="predict on images; JSON (label maps for segment) and a picture")
        pp.add_argument("--checkpoint", required=True, help=f"a {task} run folder")
        pp.add_argument("--images", required=True, help="an image file or a folder")
        pp.add_argument("--out", required=True, help="JSON to write" if task == "detect" else
                        "folder for the PNG label maps and predictions.json")
        pp.add_argument("--draw", default=None, help="PNG of the images with their predictions")
        if task == "detect":
            pp.add_argument("--threshold", type=float, default=0.5, help="lowest score kept")
    return add


def _detect_cli(args) -> None:
    from ..commands import config_from_args

    if args.what == "train":
        run_detect_train(config_from_args(args), _options(args), args.val)
    elif args.what == "eval":
        run_detect_eval(args.checkpoint, args.data, args.out, args.batch_size)
    else:
        run_detect_predict(args.checkpoint, args.images, args.out, args.draw, args.threshold)


def _segment_cli(args) -> None:
    from ..commands import config_from_args

    if args.what == "train":
        run_segment_train(config_from_args(args), _options(args), args.val)
    elif args.what == "eval":
        run_segment_eval(args.checkpoint, args.data, args.out)
    else:
        run_segment_predict(args.checkpoint, args.images, args.out, args.draw)


def _commands():
    from ..commands import Command

    return (Command("Mask R-CNN / Faster R-CNN (torchvision) on any backbone (COCO-format data)", _arguments("detect"),
                    _detect_cli),
            Command("UperNet semantic segmentation on any backbone (COCO polygons or PNG label maps)",
                    _arguments("segment"), _segment_cli))


DETECT, SEGMENT = _commands()
