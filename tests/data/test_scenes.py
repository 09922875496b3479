import hashlib
import json

import numpy as np
import pytest

from maskconv.data.datasets import find_fashion_mnist

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_scenes_byte_identical_for_a_seed_and_cached(tmp_path):
    from maskconv.cli import main

    assert main(["scenes", "--out", str(tmp_path / "a"), "--split", "val", "--num", "6", "--seed", "3"]) == 0
    from maskconv.data.scenes import make_scenes

    make_scenes(tmp_path / "b", "val", 6, 3)
    make_scenes(tmp_path / "c", "val", 6, 4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    stamp = (tmp_path / "a" / "annotations.json").stat().st_mtime_ns
    make_scenes(tmp_path / "a", "val", 6, 3)  # cached: not rewritten
    assert (tmp_path / "a" / "annotations.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds other scenes"):
        make_scenes(tmp_path / "a", "val", 7, 3)


def test_scenes_content_and_oracle(tmp_path):
    from PIL import Image

    from maskconv.data.coco import coco_evaluate, load_coco
    from maskconv.data.scenes import make_scenes

    js = make_scenes(tmp_path / "s", "train", 12, 0)
    doc = json.loads(js.read_text())
    data = load_coco(js)  # passes every check of the reader
    per_image = {}
    for a in doc["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
        assert len(a["keypoints"]) == 12 and set(a["keypoints"][2::3]) <= {0, 1, 2}
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] >= 1
        img = np.asarray(Image.open(js.parent / "images" / doc["images"][a["image_id"] - 1]["file_name"]))
        assert img[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))].max() > 25  # the item is drawn there
    assert all(1 <= len(v) <= 6 for v in per_image.values())
    assert len(doc["captions"]) == 12 and all(c["caption"].endswith(".") for c in doc["captions"])
    oracle = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
              for a in data.gt["annotations"]]
    assert coco_evaluate(data.gt, oracle)["AP"] == pytest.approx(1.0)
