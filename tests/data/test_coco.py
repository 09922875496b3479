import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskconv.data.coco import (CocoDetection, CocoFormatError, DetectionEvalTransform, DetectionTrainTransform,
                                coco_evaluate, load_coco)

LABELME = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/annotations.json")


def _oracle(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a.get("iscrowd", 0)]


def write_coco(root: Path, anns=None, images=None, cats=None, start_id: int = 0, size=(40, 30)) -> Path:
    """A small COCO folder with ids starting at ``start_id`` (0: the COCOeval pitfall) and real PNG files."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    if images is None:
        images = [{"id": start_id + i, "file_name": f"im{i}.png", "width": w, "height": h} for i in range(3)]
    for im in images:
        Image.fromarray(np.full((h, w, 3), 40 * len(im["file_name"]) % 255, np.uint8)).save(root / im["file_name"])
    if cats is None:
        cats = [{"id": start_id + k, "name": f"c{k}"} for k in range(3)]
    if anns is None:
        anns, n = [], start_id
        for i, im in enumerate(images):
            for k in range(2):
                anns.append({"id": n, "image_id": im["id"], "category_id": cats[(i + k) % 3]["id"],
                             "bbox": [2 + 10 * k, 3 + 5 * k, 12 + i, 9], "area": 108.0, "iscrowd": 0})
                n += 1
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_oracle_ap_is_one_after_remap_of_id0_file(tmp_path):
    root = write_coco(tmp_path / "c")
    raw = json.loads((root / "annotations.json").read_text())
    for a in raw["annotations"]:
        a.setdefault("iscrowd", 0)
    assert coco_evaluate(raw, _oracle(raw))["AP"] < 0.99  # the pitfall: id 0 is never "matched"
    data = load_coco(root)
    assert coco_evaluate(data.gt, _oracle(data.gt))["AP"] == pytest.approx(1.0)
    assert min(a["id"] for a in data.gt["annotations"]) == 1
    assert data.orig_category_ids == [0, 1, 2] and data.num_classes == 3


def test_class_agnostic_scoring_ignores_only_the_class(tmp_path):
    data = load_coco(write_coco(tmp_path / "c"))
    wrong = [{**d, "category_id": d["category_id"] % 3 + 1} for d in _oracle(data.gt)]  # right boxes, wrong classes
    assert coco_evaluate(data.gt, wrong)["AP50"] == 0.0
    assert coco_evaluate(data.gt, wrong, class_agnostic=True)["AP50"] == pytest.approx(1.0)
    moved = [{**d, "bbox": [d["bbox"][0] + 40, *d["bbox"][1:]]} for d in wrong]  # boxes off their objects
    assert coco_evaluate(data.gt, moved, class_agnostic=True)["AP50"] == 0.0
    assert data.gt["categories"][0]["id"] == 1 and len(data.gt["categories"]) == 3  # the input is not changed
    with pytest.raises(ValueError, match="class_agnostic"):
        coco_evaluate(data.gt, wrong, iou_type="keypoints", class_agnostic=True)


@pytest.mark.skipif(not LABELME.is_file(), reason="Debian package labelme-examples not installed")
def test_labelme_coco_file_reads_and_scores_one():
    data = load_coco(LABELME)
    assert len(data.gt["images"]) == 3 and len(data.gt["annotations"]) == 12
    assert data.category_names[0] == "_background_" and data.orig_category_ids[0] == 0
    assert coco_evaluate(data.gt, _oracle(data.gt))["AP"] == pytest.approx(1.0)
    img, target = CocoDetection(data)[0]
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and tuple(img.shape[1:]) == (338, 500)
    assert len(target["boxes"]) > 0 and target["labels"].min() >= 1


@pytest.mark.parametrize("case, expect", [
    ("json", "not valid JSON"),
    ("missing_image", "images[1] (id 1): image file"),
    ("outside", "annotations[2] (id 2): bbox"),
    ("unknown_cat", "annotations[0] (id 0): category_id 7"),
    ("unknown_img", "annotations[1] (id 1): image_id 9"),
])
def test_bad_coco_files_name_file_and_entry(tmp_path, case, expect):
    root = write_coco(tmp_path / case)
    js = root / "annotations.json"
    raw = json.loads(js.read_text())
    if case == "json":
        js.write_text(js.read_text()[:-5])
    elif case == "missing_image":
        (root / raw["images"][1]["file_name"]).unlink()
    elif case == "outside":
        raw["annotations"][2]["bbox"] = [30, 5, 20, 5]  # x + w = 50 > 40
    elif case == "unknown_cat":
        raw["annotations"][0]["category_id"] = 7
    elif case == "unknown_img":
        raw["annotations"][1]["image_id"] = 9
    if case != "json":
        js.write_text(json.dumps(raw))
    with pytest.raises(CocoFormatError) as e:
        load_coco(root)
    assert str(js) in str(e.value) and expect in str(e.value)


def test_crowd_and_degenerate_boxes_left_out_of_training_targets_only(tmp_path):
    root = write_coco(tmp_path / "c")
    raw = json.loads((root / "annotations.json").read_text())
    raw["annotations"][0]["iscrowd"] = 1
    raw["annotations"][1]["bbox"] = [5, 5, 0, 4]
    (root / "annotations.json").write_text(json.dumps(raw))
    data = load_coco(root)
    assert len(CocoDetection(data, train=True)) == 2  # image 0 has no usable object left
    assert len(CocoDetection(data, train=False).target(0)["boxes"]) == 2
    assert len(data.gt["annotations"]) == 6


def _bright_box(img: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(img[0] > 0.6, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_boxes_on_their_pixels(seed):
    img = torch.zeros(3, 60, 90, dtype=torch.uint8)
    img[:, 20:40, 30:70] = 255  # box x 30..70, y 20..40
    target = {"boxes": torch.tensor([[30.0, 20.0, 70.0, 40.0]]), "labels": torch.tensor([3]), "image_id": 1}
    torch.manual_seed(seed)
    out, t = DetectionTrainTransform(64, jitter=(0.8, 1.6))(img, target)
    assert out.shape == (3, 64, 64)
    if len(t["boxes"]) == 0:
        assert (out[0] > 0.6).sum() == 0  # the crop missed the object
        return
    box = t["boxes"][0].tolist()
    assert max(abs(a - b) for a, b in zip(box, _bright_box(out))) <= 1.5  # bilinear edges: within a pixel or so
    assert t["labels"].tolist() == [3]


def test_eval_transform_scales_and_pads():
    img = torch.zeros(1, 50, 100, dtype=torch.uint8)
    img[:, 10:20, 40:60] = 255
    target = {"boxes": torch.tensor([[40.0, 10.0, 60.0, 20.0]]), "labels": torch.tensor([1]), "image_id": 1}
    out, t = DetectionEvalTransform(64)(img, target)
    assert out.shape == (1, 64, 64) and t["unpadded_size"] == (32, 64)
    assert out[0, 40:, :].eq(0.3).all()  # bottom padding, official value
    assert t["boxes"][0].tolist() == pytest.approx([25.6, 6.4, 38.4, 12.8])


def test_coco_evaluate_refuses_what_it_cannot_score_with_one_line():
    from maskconv.data.coco import check_evaluable

    img = {"id": 1, "file_name": "a.png", "width": 10, "height": 10}
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0, "iscrowd": 0}
    det = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 1.0}]
    gt = {"images": [img], "annotations": [box], "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(CocoFormatError, match=r"annotations\[0\] has no 'segmentation'"):
        coco_evaluate(gt, det, iou_type="segm")
    assert coco_evaluate(gt, [])["AP"] == 0.0  # ground truth exists, nothing detected
    empty = {**gt, "annotations": []}
    with pytest.raises(ValueError, match="no non-crowd object"):
        coco_evaluate(empty, [])  # never AP 0.0 for "no ground truth"
    with pytest.raises(ValueError, match="no non-crowd object"):
        coco_evaluate(empty, det)
    # keypoints: a category without keypoints next to one with them is left out, not a KeyError
    kgt = {"images": [img], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "p", "keypoints": ["x"]}],
           "annotations": [{**box, "num_keypoints": 0},
                           {**box, "id": 2, "category_id": 2, "keypoints": [2, 2, 2], "num_keypoints": 1}]}
    kdet = [{"image_id": 1, "category_id": 2, "keypoints": [2, 2, 1], "score": 1.0}]
    assert coco_evaluate(kgt, kdet, iou_type="keypoints", kpt_oks_sigmas=[0.1])["AP"] == pytest.approx(1.0)
    with pytest.raises(CocoFormatError, match=r"val.json: annotations\[1\] has no 'keypoints'"):
        check_evaluable({**kgt, "annotations": [kgt["annotations"][0], {**box, "id": 2, "category_id": 2}]},
                        "keypoints", "val.json")
