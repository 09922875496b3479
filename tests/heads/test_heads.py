"""Dense transfer: Mask R-CNN / Faster R-CNN and UperNet over the dense face (heads/), their metrics, training
through the one loop, the CLI-facing eval / predict functions."""
import json

import pytest
import torch

from maskconv import create_model
from maskconv.config import load_config
from maskconv.data.coco import load_coco
from maskconv.data.datasets import find_fashion_mnist
from maskconv.heads.detection import build_detector
from maskconv.heads.segmentation import SegmentationMetric, build_segmenter
from maskconv.heads.task import (DenseOptions, SemanticMaps, evaluate_instances, evaluate_segmentation, load_dense,
                                 run_detect_train, run_segment_train)
from tests.data.test_coco import write_coco

needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist not installed")
    from maskconv.data.scenes import make_scenes

    return make_scenes(tmp_path_factory.mktemp("scenes") / "s", "train", 8, 0, size=64, max_items=3).parent


def _cfg(data, out, **kw):
    o = {"model.name": "test_convnextv2", "data.path": str(data), "data.img_size": 64, "data.batch_size": 4,
         "data.num_workers": 0, "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.lr": 1e-3, "run.out": str(out),
         "run.device": "cpu", "run.progress": False, "run.log_every_steps": 1, "run.seed": 0}
    o.update(kw)
    return load_config(overrides=o)



# ---- metrics: the ground truth as the prediction scores 1.0, and a wrong prediction does not -------------------
@needs_fmnist
def test_ground_truth_as_prediction_gives_box_and_mask_ap_one(scenes):
    res, dets = evaluate_instances(None, load_coco(scenes), oracle=True)
    assert res["AP"] == pytest.approx(1.0) and res["mask_AP"] == pytest.approx(1.0)
    assert all("segmentation" in d for d in dets)
    from maskconv.data.coco import coco_evaluate

    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in dets]  # IoU <= 1/3
    assert coco_evaluate(load_coco(scenes).gt, shifted)["AP50"] < 0.1


def test_ground_truth_as_prediction_on_an_id0_file(tmp_path):
    data = load_coco(write_coco(tmp_path / "c", size=(60, 45)))  # ids from 0, boxes only
    from maskconv.data.coco import CocoDetection, CocoFormatError

    with pytest.raises(CocoFormatError, match="no 'segmentation'"):
        CocoDetection(data, masks=True)[0]
    for a in data.gt["annotations"]:  # box-shaped polygons
        x, y, w, h = a["bbox"]
        a.setdefault("segmentation", [[x, y, x + w, y, x + w, y + h, x, y + h]])
    res, _ = evaluate_instances(None, data, oracle=True)
    assert res["AP"] == pytest.approx(1.0) and res["mask_AP"] == pytest.approx(1.0)


def test_mask_rcnn_on_boxes_only_data_is_refused_before_any_work(tmp_path):
    root = write_coco(tmp_path / "c", size=(60, 45))
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'segmentation'.*--masks false"):
        run_detect_train(_cfg(root, tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@needs_fmnist
def test_ground_truth_as_prediction_gives_miou_one_and_metric_counts_right(scenes):
    res = evaluate_segmentation(None, SemanticMaps(scenes), 64, oracle=True)
    assert res["mIoU"] == 1.0 and res["pixel_acc"] == 1.0 and res["images"] == 8
    m = SegmentationMetric(3)
    m.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 255]]))  # class 2 predicted 0 times right
    r = m.compute()
    assert r["per_class_IoU"] == [1.0, 0.5, 0.0] and r["mIoU"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="no labelled pixels"):
        SegmentationMetric(2).compute()


def test_png_label_maps_are_read(tmp_path):
    from PIL import Image
    import numpy as np

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    lab = np.zeros((20, 30), np.uint8)
    lab[5:10, 5:25] = 2
    lab[0, 0] = 255
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(lab).save(tmp_path / "labels" / "a.png")
    ds = SemanticMaps(tmp_path)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    img, t = ds[0]
    assert img.shape == (3, 20, 30) and torch.equal(t["semantic"], torch.from_numpy(lab.astype(np.int64)))
    assert evaluate_segmentation(None, ds, 32, oracle=True)["mIoU"] == 1.0  # class_1 absent: no IoU, not 0


# ---- models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_convnextv2", "test_vit", "test_convmae"])
def test_upernet_output_size_equals_input_for_non_square_sizes(name):
    model = build_segmenter(name, 4, img_size=64, channels=16).eval()
    for h, w in ((64, 96), (50, 70), (33, 17)):
        with torch.no_grad():
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)


@pytest.mark.parametrize("name", ["test_convnextv2", "test_vit", "test_convmae", "test_replknet", "test_slak",
                                  "test_roadmap"])
def test_mask_rcnn_trains_and_predicts_on_every_family(name):
    model = build_detector(name, 3, img_size=64, anchor_size=8, fpn_dim=16, head_dim=16, proposals=50, roi_samples=32)
    t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
         "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    t["masks"][0, 6:40, 4:30] = 1
    losses = model([torch.rand(3, 64, 64)] * 2, [t, t])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    body = model.backbone.body
    assert all(p.grad is not None for p in body.model.parameters() if p.requires_grad and p.ndim > 1)
    out = model.eval()([torch.rand(3, 48, 80)])[0]  # another size and aspect
    assert out["masks"].shape[-2:] == (48, 80)


def test_layer_decay_reaches_the_backbone_inside_the_detector():
    from maskconv.engine.optim import param_groups

    model = build_detector("test_convnextv2", 2, img_size=64, fpn_dim=16, head_dim=16)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    body = model.backbone.body.model
    top = body.num_lr_layers()
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["backbone.body.model.stem.0.weight"] == 0.5 ** (top - body.layer_id("stem.0.weight"))
    assert scale["roi_heads.box_predictor.cls_score.weight"] == 1.0 and scale["backbone.fpn.inner_blocks.0.0.weight"] == 1.0
    assert scale["backbone.body.norms.0.weight"] == 1.0  # the official per-output norms are new layers
    seg = build_segmenter("test_vit", 3, img_size=64, channels=16)
    groups = param_groups(seg, 0.05, layer_decay=0.5)
    sc = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert sc["backbone.model.pos_embed"] == 0.5 ** seg.backbone.model.num_lr_layers() and sc["head.classifier.weight"] == 1
    nodecay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"backbone.model.pos_embed", "backbone.model.cls_token"} <= nodecay  # the ViT's own rule, 3-D tensors
    assert "head.classifier.weight" not in nodecay


def test_faster_rcnn_is_the_same_detector_without_masks():
    model = build_detector("test_convnextv2", 2, masks=False, img_size=64, anchor_size=8, fpn_dim=16, head_dim=16)
    t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    assert "loss_mask" not in model([torch.rand(3, 64, 64)], [t]) and not model.roi_heads.has_mask()
    assert model.layer_id("backbone.body.model.stem.0.weight") == model.backbone.body.model.layer_id("stem.0.weight")


@needs_fmnist
def test_detect_resumed_after_a_crash_equals_uninterrupted(scenes, tmp_path, monkeypatch, capsys):
    """Targets as lists of dicts (boxes + masks) through the loop resume exactly: RPN / ROI sampling draws from
    the RNG the checkpoints hold, the transform is seeded per sample."""
    from safetensors.torch import load_file
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    opts = DenseOptions(anchor_size=8, fpn_dim=16, head_dim=16, proposals=50, roi_samples=32)  # jitter + flip on
    kw = {"optim.epochs": 2, "run.save_every_steps": 1}
    run_detect_train(_cfg(scenes, tmp_path / "a", **kw), opts)
    real, calls = GeneralizedRCNN.forward, {"n": 0}

    def crash_on_fourth(self, images, targets=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("simulated crash in step 4")
        return real(self, images, targets)

    monkeypatch.setattr(GeneralizedRCNN, "forward", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated"):
        run_detect_train(_cfg(scenes, tmp_path / "b", **kw), opts)
    monkeypatch.setattr(GeneralizedRCNN, "forward", real)
    capsys.readouterr()
    run_detect_train(_cfg(scenes, tmp_path / "b", **kw), opts)
    assert "epoch 1, step 3" in capsys.readouterr().out  # resumed from step 3's checkpoint
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- overfitting a handful of scenes: the whole pipeline learns (slow) -----------------------------------------
@needs_fmnist
@pytest.mark.slow
def test_mask_rcnn_overfits_a_handful_of_scenes(scenes, tmp_path):
    cfg = _cfg(scenes, tmp_path / "o", **{"optim.epochs": 60, "optim.warmup_epochs": 1, "optim.weight_decay": 0.0,
                                          "optim.lr": 2e-3, "run.log_every_steps": 100, "run.save_every_epochs": 1000})
    res = run_detect_train(cfg, DenseOptions(anchor_size=8, fpn_dim=64, head_dim=64, proposals=100, roi_samples=64,
                                             jitter_min=1.0, jitter_max=1.0, hflip=False))
    r, _ = evaluate_instances(res.model, load_coco(scenes))
    assert r["AP50"] >= 0.9 and r["mask_AP50"] >= 0.9, r


@needs_fmnist
@pytest.mark.slow
def test_upernet_overfits_a_handful_of_scenes(scenes, tmp_path):
    cfg = _cfg(scenes, tmp_path / "o", **{"optim.epochs": 60, "optim.warmup_epochs": 1, "optim.weight_decay": 0.0,
                                          "optim.lr": 2e-3, "run.log_every_steps": 100, "run.save_every_epochs": 1000,
                                          "model.stem_stride": 2})  # stride-2 finest map: the 64-px items' edges
    res = run_segment_train(cfg, DenseOptions(channels=64, jitter_min=1.0, jitter_max=1.0, hflip=False))
    r = evaluate_segmentation(res.model, SemanticMaps(scenes), 64)
    assert r["mIoU"] >= 0.9, r


@needs_fmnist
def test_cli_detect_and_segment(scenes, tmp_path):
    from maskconv.cli import main

    common = ["--backbone", "test_convnextv2", "--data", str(scenes), "data.img_size=64", "data.batch_size=4",
              "data.num_workers=0", "optim.epochs=1", "optim.lr=1e-3", "run.progress=false", "--anchor-size", "8",
              "--fpn-dim", "16", "--head-dim", "16", "--proposals", "50", "--roi-samples", "32", "--channels", "16"]
    det, seg = tmp_path / "det", tmp_path / "seg"
    assert main(["detect", "train", *common, "--val", str(scenes), "--out", str(det)]) == 0
    rows = [json.loads(x) for x in (det / "metrics.jsonl").read_text().splitlines()]
    assert "val_mask_AP50" in rows[-1] and "val_AP50" in rows[-1]
    model, meta, o = load_dense(det)
    assert o.masks and o.head_dim == 16 and meta["task"] == "detect" and len(meta["categories"]) == 10
    assert main(["detect", "eval", "--checkpoint", str(det), "--data", str(scenes)]) == 0
    res = json.loads((det / "eval" / "eval.json").read_text())
    assert res["mask_AP50"] == pytest.approx(rows[-1]["val_mask_AP50"])  # the same weights score the same
    preds = json.loads((det / "eval" / "predictions.json").read_text())
    assert all("segmentation" in d for d in preds) and len(preds) == res["detections"]
    assert main(["detect", "predict", "--checkpoint", str(det), "--images", str(scenes / "images"), "--out",
                 str(tmp_path / "d.json"), "--draw", str(tmp_path / "d.png"), "--threshold", "0"]) == 0
    assert (tmp_path / "d.png").is_file() and all(set(r) >= {"file_name", "category", "bbox", "score"}
                                                  for r in json.loads((tmp_path / "d.json").read_text()))
    assert main(["segment", "train", *common, "--val", str(scenes), "--out", str(seg)]) == 0
    rows = [json.loads(x) for x in (seg / "metrics.jsonl").read_text().splitlines()]
    assert main(["segment", "eval", "--checkpoint", str(seg), "--data", str(scenes)]) == 0
    res = json.loads((seg / "eval" / "eval.json").read_text())
    assert res["mIoU"] == pytest.approx(rows[-1]["val_mIoU"]) and len(res["per_class_IoU"]) == 11
    assert main(["segment", "predict", "--checkpoint", str(seg), "--images", str(scenes / "images" / "train_000000.png"),
                 "--out", str(tmp_path / "maps"), "--draw", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "maps" / "train_000000.png").is_file() and (tmp_path / "s.png").is_file()
    assert main(["detect", "eval", "--checkpoint", str(seg), "--data", str(scenes)]) != 0  # a segment run: refused


@pytest.mark.parametrize("name", ["test_convnextv2", "test_vit", "test_convmae", "test_replknet"])
def test_every_trainable_parameter_gets_a_gradient(name):
    """DDP (no find_unused_parameters) stops at step 2 if a trainable parameter takes no part in the forward:
    the backbone's classifier (head norm / fc, a ViT's final norm) must be frozen, its keys kept."""
    det = build_detector(name, 3, img_size=64, anchor_size=8, fpn_dim=16, head_dim=16, proposals=50, roi_samples=32)
    t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
         "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    t["masks"][0, 6:40, 4:30] = 1
    sum(det([torch.rand(3, 64, 64)] * 2, [t, t]).values()).backward()
    seg = build_segmenter(name, 4, img_size=64, channels=16)
    seg(torch.randn(2, 3, 64, 64)).sum().backward()
    for model in (det, seg):
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and all(".model." in n for n in frozen)  # only the backbone's unused part
    body = seg.backbone.model  # the classifier keys stay: a classifier checkpoint still loads strict
    assert set(body.state_dict()) == set(create_model(name, num_classes=0, **(
        {"img_size": 64} if name in ("test_vit", "test_convmae") else {})).state_dict())


def _ddp_steps(rank: int, port: int, name: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_segmenter(name, 3, img_size=32, channels=8))
        for _ in range(3):  # a parameter left out of the reduction fails at the second step
            model(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_segmenter_trains_three_steps_under_two_process_ddp():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_steps, args=(port, "test_convnextv2"), nprocs=2)


def test_bool_flags_refuse_other_words():
    import argparse

    from maskconv.heads.task import _option_arguments, _options

    p = argparse.ArgumentParser()
    _option_arguments(p)
    assert _options(p.parse_args(["--masks", "false"])).masks is False
    assert _options(p.parse_args(["--masks", "Yes"])).masks is True
    with pytest.raises(SystemExit):
        p.parse_args(["--masks", "flase"])
