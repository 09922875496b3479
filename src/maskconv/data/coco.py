"""COCO-format instance data: read and check a JSON + image folder, remap ids, box-aware transforms, COCOeval.

* ``load_coco``: reads a COCO instances JSON, checks every entry (a bad file raises ``CocoFormatError`` naming
  the file and the entry), and remaps image / annotation / category ids to 1..N in file order (categories in
  id order). COCOeval uses the matched ground-truth id as its "matched" flag, so an annotation id 0 is never
  counted as matched and an oracle scores < 1 on files whose ids start at 0 (labelme's exporter writes such
  files). After the remap the class label of an object is its category id, 1..K: 0 stays free for padding, as
  in the official Pix2Seq code (``vocab.py``: class token = label + 100, label 0 = padding).
* ``CocoDetection``: ``(image uint8 (C, H, W), target)`` per image; target boxes are xyxy pixels.
  Crowd and degenerate boxes are kept in the ground truth (COCOeval ignores crowd regions) and dropped from the
  training targets, as ``data_utils.filter_invalid_objects(filter_crowd=True)`` does in google-research/pix2seq.
* ``DetectionTrainTransform`` / ``DetectionEvalTransform``: the official Pix2Seq image pipeline
  (``data_utils.preprocess_train`` / ``preprocess_eval``: scale jitter keeping the aspect, a fixed-size random
  crop, horizontal flip, bottom/right padding) on torchvision ``tv_tensors.BoundingBoxes``, so boxes follow.
* ``coco_evaluate``: pycocotools COCOeval (``bbox``, ``segm`` or ``keypoints``) of results in COCO results format.

Pix2Seq v2 reads more of the file, all checked here: polygon ``segmentation`` lists (RLE dicts are accepted for
crowd regions only), ``keypoints`` triples (x, y, v) as many as the category's ``keypoints`` names, and captions
(a top-level ``captions`` list of ``{"image_id", "caption"}``, as the scenes write it).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["CocoFormatError", "CocoData", "load_coco", "CocoDetection", "DetectionTrainTransform",
           "DetectionEvalTransform", "coco_evaluate", "check_evaluable", "find_annotations", "annotation_mask", "IGNORE_INDEX"]

IGNORE_INDEX = 255  # semantic maps: pixels no loss or metric reads (padding, crowd regions, PNG value 255)
BOX_TOLERANCE = 1.0  # px a box may cross the image border (exporters round); beyond it the file is wrong


class CocoFormatError(ValueError):
    """A COCO file is malformed or inconsistent (the message names the file and the entry)."""


@dataclass
class CocoData:
    """A checked COCO file with ids remapped to 1..N. ``gt`` is the remapped dict (what COCOeval reads);
    ``orig_*_ids[i]`` is the file's id of remapped id i + 1."""
    path: Path
    image_dir: Path
    gt: dict
    orig_image_ids: list
    orig_category_ids: list
    category_names: list[str]
    captions: dict | None = None  # remapped image id -> [caption, ...]; None: the file has none
    keypoint_names: list[str] | None = None  # one list shared by the categories that declare keypoints

    @property
    def num_classes(self) -> int:
        return len(self.category_names)


def find_annotations(root: str | Path) -> Path:
    """``root`` = a COCO JSON file, or a folder holding ``annotations.json``."""
    root = Path(root)
    js = root / "annotations.json" if root.is_dir() else root
    if not js.is_file():
        raise FileNotFoundError(f"no COCO annotations: {js} does not exist")
    return js


def _image_dir(js: Path, images: list) -> Path:
    """The folder the file names are relative to: beside the JSON, or its ``images/`` / ``JPEGImages/``."""
    first = images[0].get("file_name", "") if images and isinstance(images[0], dict) else ""
    for d in (js.parent, js.parent / "images", js.parent / "JPEGImages"):
        if first and (d / first).is_file():
            return d
    return js.parent


def _need(entry: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise CocoFormatError(f"{where} lacks {', '.join(missing)}")


def _check_segmentation(seg, iscrowd: bool, where: str) -> None:
    if isinstance(seg, dict):
        if not iscrowd:
            raise CocoFormatError(f"{where}: an RLE segmentation on a non-crowd object; polygons are needed")
        return
    if not isinstance(seg, list) or not seg:
        raise CocoFormatError(f"{where}: segmentation must be a non-empty list of polygons, got {str(seg)[:60]}")
    for i, part in enumerate(seg):
        if not (isinstance(part, list) and all(isinstance(v, (int, float)) for v in part)):
            raise CocoFormatError(f"{where}: segmentation part {i} is not a list of numbers")
        if len(part) % 2 or len(part) < 6:
            raise CocoFormatError(f"{where}: segmentation part {i} has {len(part)} numbers; a polygon needs an even "
                                  "count >= 6 (x, y pairs of 3+ vertices)")


def _check_keypoints(kps, names: list | None, where: str) -> None:
    if names is None:
        raise CocoFormatError(f"{where}: keypoints on an object whose category declares no 'keypoints' names")
    if not (isinstance(kps, list) and all(isinstance(v, (int, float)) for v in kps)):
        raise CocoFormatError(f"{where}: keypoints must be a list of numbers (x, y, v triples)")
    if len(kps) != 3 * len(names):
        raise CocoFormatError(f"{where}: {len(kps)} keypoint numbers; its category names {len(names)} points, "
                              f"so {3 * len(names)} are needed (x, y, v each)")
    bad = [v for v in kps[2::3] if v not in (0, 1, 2)]
    if bad:
        raise CocoFormatError(f"{where}: keypoint visibility {bad[0]!r}; COCO uses 0 (unlabelled), 1 (occluded), "
                              "2 (visible)")


def load_coco(path: str | Path, image_dir: str | Path | None = None, check_files: bool = True) -> CocoData:
    """Read and check a COCO instances file; see the module docstring for the remap."""
    js = find_annotations(path)
    try:
        raw = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{js}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise CocoFormatError(f"{js}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise CocoFormatError(f"{js}: missing or non-list '{key}'")
    image_dir = Path(image_dir) if image_dir else _image_dir(js, raw["images"])
    cats = sorted(raw["categories"], key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0)
    cat_map: dict = {}
    for k, c in enumerate(cats):
        _need(c, ("id", "name"), f"{js}: categories entry {c!r}")
        if c["id"] in cat_map:
            raise CocoFormatError(f"{js}: category id {c['id']} appears twice")
        cat_map[c["id"]] = k + 1
    kp_names = {c["id"]: list(c["keypoints"]) for c in cats if c.get("keypoints")}
    if len({tuple(v) for v in kp_names.values()}) > 1:
        raise CocoFormatError(f"{js}: categories declare different keypoint lists; one shared list is supported")
    img_map: dict = {}
    sizes = {}
    images = []
    for k, im in enumerate(raw["images"]):
        where = f"{js}: images[{k}]"
        _need(im, ("id", "file_name", "width", "height"), where)
        if im["id"] in img_map:
            raise CocoFormatError(f"{where}: image id {im['id']} appears twice")
        if check_files and not (image_dir / im["file_name"]).is_file():
            raise CocoFormatError(f"{where} (id {im['id']}): image file {image_dir / im['file_name']} not found")
        img_map[im["id"]] = k + 1
        sizes[im["id"]] = (float(im["width"]), float(im["height"]))
        images.append({**im, "id": k + 1})
    anns = []
    for k, a in enumerate(raw["annotations"]):
        where = f"{js}: annotations[{k}] (id {a.get('id')})" if isinstance(a, dict) else f"{js}: annotations[{k}]"
        if not isinstance(a, dict):
            raise CocoFormatError(f"{where} is not an object")
        _need(a, ("image_id", "category_id", "bbox"), where)
        if a["image_id"] not in img_map:
            raise CocoFormatError(f"{where}: image_id {a['image_id']} is not in 'images'")
        if a["category_id"] not in cat_map:
            raise CocoFormatError(f"{where}: category_id {a['category_id']} is not in 'categories'")
        b = a["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise CocoFormatError(f"{where}: bbox must be [x, y, w, h] numbers, got {b!r}")
        w_img, h_img = sizes[a["image_id"]]
        x, y, w, h = b
        if w < 0 or h < 0 or x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > w_img + BOX_TOLERANCE \
                or y + h > h_img + BOX_TOLERANCE:
            raise CocoFormatError(f"{where}: bbox {b} lies outside its {w_img:g}x{h_img:g} image")
        if "segmentation" in a:
            _check_segmentation(a["segmentation"], bool(a.get("iscrowd", 0)), where)
        if "keypoints" in a:
            _check_keypoints(a["keypoints"], kp_names.get(a["category_id"]), where)
        ann = {**a, "id": k + 1, "image_id": img_map[a["image_id"]], "category_id": cat_map[a["category_id"]],
               "iscrowd": int(a.get("iscrowd", 0))}
        ann.setdefault("area", float(w * h))  # COCOeval needs an area (for its area ranges)
        # COCOeval ignores objects with num_keypoints 0 for OKS (and reads the key on every object it loads)
        ann.setdefault("num_keypoints", sum(1 for v in a["keypoints"][2::3] if v > 0) if "keypoints" in a else 0)
        anns.append(ann)
    captions = None
    if "captions" in raw:
        if not isinstance(raw["captions"], list):
            raise CocoFormatError(f"{js}: 'captions' must be a list of {{image_id, caption}} entries")
        captions = {i: [] for i in img_map.values()}
        for k, c in enumerate(raw["captions"]):
            where = f"{js}: captions[{k}]"
            if not isinstance(c, dict):
                raise CocoFormatError(f"{where} is not an object")
            _need(c, ("image_id", "caption"), where)
            if c["image_id"] not in img_map:
                raise CocoFormatError(f"{where}: image_id {c['image_id']} is not in 'images'")
            if not isinstance(c["caption"], str) or not c["caption"].strip():
                raise CocoFormatError(f"{where}: caption must be a non-empty string, got {c['caption']!r}")
            captions[img_map[c["image_id"]]].append(c["caption"])
    gt = {"info": raw.get("info", {}), "images": images, "annotations": anns,
          "categories": [{**c, "id": cat_map[c["id"]]} for c in cats]}
    return CocoData(js, image_dir, gt, [im["id"] for im in raw["images"]], [c["id"] for c in cats],
                    [str(c["name"]) for c in cats], captions, next(iter(kp_names.values()), None))


class CocoDetection(Dataset):
    """Images of a ``CocoData`` with their objects: ``(image uint8 (C, H, W), target)``, target =
    ``{"boxes": (N, 4) float xyxy px, "labels": (N,) long 1..K, "image_id": int}``. ``train=True`` drops crowd
    and degenerate boxes (official ``filter_invalid_objects``) and images left with none; eval keeps all."""

    def __init__(self, data: CocoData, in_chans: int = 3, train: bool = True, masks: bool = False):
        self.data, self.in_chans, self.train, self.masks = data, in_chans, train, masks
        per_image: dict[int, list] = {im["id"]: [] for im in data.gt["images"]}
        for a in data.gt["annotations"]:
            per_image[a["image_id"]].append(a)
        self.images = data.gt["images"]
        if train:  # official: images without a usable object are left out of training
            self.images = [im for im in self.images if any(not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0
                                                           for a in per_image[im["id"]])]
        self.objects = [per_image[im["id"]] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def target(self, i: int) -> dict:
        """Also, for Pix2Seq v2: ``polygons`` (per object a list of (K, 2) xy float tensors; empty for an RLE or
        no segmentation), ``keypoints`` ((N, K, 3) x, y, v; when the file names keypoints) and ``captions``."""
        boxes, labels, polys, kps = [], [], [], []
        nk = len(self.data.keypoint_names or ())
        for a in self.objects[i]:
            x, y, w, h = a["bbox"]
            if self.train and (a["iscrowd"] or w <= 0 or h <= 0):
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(a["category_id"])
            seg = a.get("segmentation")
            polys.append([torch.tensor(p, dtype=torch.float32).view(-1, 2) for p in seg] if isinstance(seg, list)
                         else [])
            kps.append(a["keypoints"] if "keypoints" in a else [0.0] * (3 * nk))
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(labels, dtype=torch.long), "image_id": self.images[i]["id"], "polygons": polys}
        if nk:
            t["keypoints"] = torch.tensor(kps, dtype=torch.float32).reshape(-1, nk, 3)
        if self.data.captions is not None:
            t["captions"] = self.data.captions[self.images[i]["id"]]
        if self.masks:  # (N, H, W) uint8, one per kept object, from its polygons / RLE
            im = self.images[i]
            kept = [a for a in self.objects[i] if not (self.train and (a["iscrowd"] or a["bbox"][2] <= 0
                                                                       or a["bbox"][3] <= 0))]
            t["masks"] = torch.stack([annotation_mask(a, im["height"], im["width"], self.data.path) for a in kept]) \
                if kept else torch.zeros(0, im["height"], im["width"], dtype=torch.uint8)
        return t

    def __getitem__(self, i: int):
        from .datasets import decode_image

        try:
            img = decode_image(self.data.image_dir / self.images[i]["file_name"], self.in_chans)
        except Exception:
            return None  # counted and reported by the training loop (collate_skip)
        return img, self.target(i)


def annotation_mask(ann: dict, h: int, w: int, where="") -> torch.Tensor:
    """An annotation's region as an (h, w) uint8 mask: COCO polygons (several parts merged), RLE or
    uncompressed RLE (pycocotools). An annotation without ``segmentation`` is an error naming it."""
    seg = ann.get("segmentation")
    if not seg:
        raise CocoFormatError(f"{where}: annotation id {ann.get('id')} has no 'segmentation' (masks need polygons "
                              "or RLE)")
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("masks from COCO polygons need pycocotools: pip install 'maskconv[detect]'") from None
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return torch.from_numpy(mask_utils.decode(rle)).to(torch.uint8)


def _boxes(target: dict, size: tuple[int, int]):
    from torchvision import tv_tensors

    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=size)


def _points(target: dict, size: tuple[int, int]):
    from torchvision import tv_tensors

    return tv_tensors.KeyPoints(target["points"].reshape(-1, 2), canvas_size=size)


class DetectionTrainTransform:
    """Official Pix2Seq train pipeline on (image uint8 (C, H, W), target): scale jitter in [lo, hi] of ``size``
    (aspect kept), random crop of at most size x size, horizontal flip, then pad bottom/right to size x size.
    Boxes cut to nothing by the crop are dropped. Returns (float image (C, size, size) in [0, 1], target with
    boxes in padded-image pixels, ``unpadded_size`` and ``hflip``). ``target["points"]`` ((P, 2) xy: polygon
    vertices, keypoints), when given, moves with the image (not clipped: the caller decides what leaves the crop);
    the boxes' kept-mask is ``target["keep"]``."""

    def __init__(self, size: int, jitter: tuple[float, float] = (0.3, 2.0), hflip: bool = True, pad_value: float = 0.3):
        self.size, self.jitter, self.hflip, self.pad_value = size, jitter, hflip, pad_value

    def __call__(self, img: torch.Tensor, target: dict):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        h, w = img.shape[-2:]
        boxes = _boxes(target, (h, w))
        pts = _points(target, (h, w)) if "points" in target else None
        s = float(torch.empty(()).uniform_(*self.jitter)) * self.size / max(h, w)  # official scale_jitter
        nh, nw = max(1, int(h * s)), max(1, int(w * s))
        # masks follow the pixels (nearest-neighbour resize): "masks" (N, H, W) per object, "semantic" (H, W) classes
        dense = {k: tv_tensors.Mask(target[k]) for k in ("masks", "semantic") if k in target}
        img, boxes = TF.resize(img, [nh, nw], antialias=True), TF.resize(boxes, [nh, nw])
        dense = {k: TF.resize(v, [nh, nw]) for k, v in dense.items()}
        ch, cw = min(self.size, nh), min(self.size, nw)  # official fixed_size_crop
        top = int(float(torch.rand(())) * (nh - ch))
        left = int(float(torch.rand(())) * (nw - cw))
        img, boxes = TF.crop(img, top, left, ch, cw), TF.crop(boxes, top, left, ch, cw)
        dense = {k: TF.crop(v, top, left, ch, cw) for k, v in dense.items()}
        if pts is not None:
            pts = TF.crop(TF.resize(pts, [nh, nw]), top, left, ch, cw)
        flip = self.hflip and float(torch.rand(())) < 0.5
        if flip:
            img, boxes = TF.horizontal_flip(img), TF.horizontal_flip(boxes)
            dense = {k: TF.horizontal_flip(v) for k, v in dense.items()}
            if pts is not None:  # COCO coordinates are continuous (pixel j spans [j, j+1]): x -> width - x, as
                pts = pts.as_subclass(torch.Tensor) * torch.tensor([-1.0, 1.0]) + torch.tensor([float(cw), 0.0])
                # for boxes (torchvision flips key points to width - 1 - x, the pixel-index convention)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # official filter_invalid_objects
        extra = {"points": pts.as_subclass(torch.Tensor), "keep": keep} if pts is not None else {}
        out = {**target, "boxes": boxes.as_subclass(torch.Tensor)[keep], "labels": target["labels"][keep],
               "unpadded_size": (ch, cw), "hflip": flip, **extra}
        if "masks" in dense:  # padding is background
            out["masks"] = _pad_mask(dense["masks"].as_subclass(torch.Tensor)[keep], self.size, 0)
        if "semantic" in dense:  # padding is ignored by the loss
            out["semantic"] = _pad_mask(dense["semantic"].as_subclass(torch.Tensor), self.size, IGNORE_INDEX)
        return _pad(img, self.size, self.pad_value), out


class DetectionEvalTransform:
    """Official Pix2Seq eval pipeline: resize the longer side to ``size`` (aspect kept), pad bottom/right.
    ``target["scale"]`` = resized / original, to map predictions back to the original pixels."""

    def __init__(self, size: int, pad_value: float = 0.3):
        self.size, self.pad_value = size, pad_value

    def __call__(self, img: torch.Tensor, target: dict):
        from torchvision.transforms.v2 import functional as TF

        h, w = img.shape[-2:]
        s = self.size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        boxes = TF.resize(_boxes(target, (h, w)), [nh, nw]).as_subclass(torch.Tensor)
        img = TF.resize(img, [nh, nw], antialias=True)
        extra = {}
        if "points" in target:
            extra["points"] = TF.resize(_points(target, (h, w)), [nh, nw]).as_subclass(torch.Tensor)
        return _pad(img, self.size, self.pad_value), {**target, "boxes": boxes, "unpadded_size": (nh, nw),
                                                      "scale": (nh / h, nw / w), **extra}


def _pad_mask(m: torch.Tensor, size: int, value: int) -> torch.Tensor:
    """(..., h, w) integer mask -> (..., size, size), padded bottom/right with ``value``."""
    out = torch.full((*m.shape[:-2], size, size), value, dtype=m.dtype)
    out[..., :m.shape[-2], :m.shape[-1]] = m
    return out


def _pad(img: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """uint8 (C, h, w) -> float (C, size, size) in [0, 1], padded bottom/right with ``value`` (official 0.3)."""
    out = torch.full((img.shape[0], size, size), value, dtype=torch.float32)
    out[:, :img.shape[1], :img.shape[2]] = img.float() / 255.0
    return out


def _kpt_categories(gt: dict) -> list[int]:
    return [c["id"] for c in gt["categories"] if c.get("keypoints")]


def check_evaluable(gt: dict, iou_type: str, where="ground truth") -> None:
    """Refuse, with one line naming ``where`` (the file) and the entry, ground truth that ``coco_evaluate``
    cannot score for ``iou_type``: an object without ``segmentation`` (segm: pycocotools rasterizes every
    object, crowd included), an object of a keypoint category without ``keypoints``, or nothing scoreable at
    all (no non-crowd object; for keypoints none with a labelled point). Call it on eval data before any work."""
    anns = gt["annotations"]
    if iou_type == "segm":
        bare = next((a for a in anns if not a.get("segmentation")), None)
        if bare is not None:
            raise CocoFormatError(f"{where}: annotations[{bare['id'] - 1}] has no 'segmentation'; mask AP needs "
                                  "polygons or RLE on every object")
    if iou_type == "keypoints":
        cats = set(_kpt_categories(gt))
        if not cats:
            raise CocoFormatError(f"{where}: no category declares 'keypoints': no keypoint AP to compute")
        bare = next((a for a in anns if a["category_id"] in cats and "keypoints" not in a), None)
        if bare is not None:
            raise CocoFormatError(f"{where}: annotations[{bare['id'] - 1}] has no 'keypoints' although its "
                                  "category declares them; keypoint AP needs them on every such object")
        anns = [a for a in anns if a["category_id"] in cats and a.get("num_keypoints", 0) > 0]
    if not any(not a.get("iscrowd", 0) for a in anns):
        raise CocoFormatError(f"{where}: no non-crowd {'object with keypoints' if iou_type == 'keypoints' else 'object'}"
                              f" to score: {iou_type} AP is undefined")


def coco_evaluate(gt: dict, detections: list[dict], quiet: bool = True, iou_type: str = "bbox",
                  kpt_oks_sigmas=None, class_agnostic: bool = False) -> dict:
    """COCO AP / AP50 / AP75 (pycocotools) of ``detections`` (COCO results format: image_id, category_id,
    score and bbox xywh, segmentation RLE or keypoints) against the remapped ground truth ``gt``; ``iou_type``
    bbox | segm | keypoints (``kpt_oks_sigmas``: one per keypoint, default COCO's 17 person sigmas).
    APs/APm/APl are not reported: COCO's area ranges mean nothing on small canvases. Ground truth it cannot
    score (``check_evaluable``) or an AP pycocotools leaves undefined (-1 / NaN) raises a one-line ValueError:
    0.0 means only "there is ground truth and nothing of it was found". Keypoint AP is over the categories
    that declare keypoints. ``class_agnostic``: every object and detection one category - does the model find
    the objects, whatever class it names (bbox / segm)."""
    if class_agnostic:
        if iou_type == "keypoints":
            raise ValueError("class_agnostic scoring is for bbox / segm: keypoints belong to their category")
        gt = {**gt, "categories": [{"id": 1, "name": "object"}],
              "annotations": [{**a, "category_id": 1} for a in gt["annotations"]]}
        detections = [{**d, "category_id": 1} for d in detections]
    if iou_type not in ("bbox", "segm", "keypoints"):
        raise ValueError(f"iou_type={iou_type!r}: use 'bbox', 'segm' or 'keypoints'")
    check_evaluable(gt, iou_type)
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO evaluation needs pycocotools: pip install 'maskconv[detect]'") from None
    import contextlib
    import io

    import numpy as np

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "detections": 0}
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), iou_type)
        if kpt_oks_sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64)
        if iou_type == "keypoints":  # objects of categories without keypoints have nothing to score
            ev.params.catIds = _kpt_categories(gt)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(v) for v in ev.stats[:3]]
    if not all(v >= 0 for v in s):  # -1: no ground truth pycocotools could score; NaN
        raise ValueError(f"{iou_type} AP is undefined ({s[0]}): the ground truth has no object pycocotools scores")
    return {"AP": s[0], "AP50": s[1], "AP75": s[2], "detections": len(detections)}
