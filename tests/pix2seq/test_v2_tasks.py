"""Pix2Seq v2 end to end: oracles through the task tokenizers, multi-task training, eval of every task, predict."""
import json
import math

import pytest
import torch

from maskconv.config import load_config
from maskconv.data.coco import load_coco
from maskconv.data.datasets import find_fashion_mnist
from maskconv.pix2seq.caption import WordVocab
from maskconv.pix2seq.multitask import (MultiTaskTrainTransform, build_taskset, evaluate_captions,
                                        evaluate_instance_task, multitask_losses)
from maskconv.pix2seq.task import (Pix2SeqOptions, build_pix2seq, load_pix2seq, run_pix2seq_eval,
                                   run_pix2seq_predict, run_pix2seq_train)
from maskconv.pix2seq.vocab import INVISIBLE_TOKEN, TASK_TOKENS

needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")
ALL = "det,seg,kpt,cap"


@pytest.fixture(scope="module")
def val_scenes(tmp_path_factory):
    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist not installed")
    from maskconv.data.scenes import make_scenes

    return load_coco(make_scenes(tmp_path_factory.mktemp("v2val") / "val", "val", 30, 0))


def _taskset(data, **kw):
    o = Pix2SeqOptions(tasks=ALL, seg_max_points=32, seg_max_instances=6, **kw)
    words = WordVocab.build(c for cs in data.captions.values() for c in cs).words
    return o, build_taskset(o, 128, words, data.keypoint_names)


def test_oracle_segm_and_keypoint_ap_on_scenes(val_scenes):
    o, ts = _taskset(val_scenes)
    seg, dets = evaluate_instance_task("seg", None, ts, val_scenes, o, 128, oracle=True)
    kpt, _ = evaluate_instance_task("kpt", None, ts, val_scenes, o, 128, oracle=True)
    assert seg["AP50"] >= 0.95 and kpt["AP"] >= 0.95, (seg, kpt)
    assert seg["detections"] == len(val_scenes.gt["annotations"]) and "counts" in dets[0]["segmentation"]
    o16, ts16 = _taskset(val_scenes, bins=16)  # the checks see quantization
    assert evaluate_instance_task("seg", None, ts16, val_scenes, o16, 128, oracle=True)[0]["AP"] < seg["AP"] - 0.3
    assert evaluate_instance_task("kpt", None, ts16, val_scenes, o16, 128, oracle=True)[0]["AP"] < 0.5


def test_oracle_captions_score_bleu_one(val_scenes):
    o, ts = _taskset(val_scenes)
    r, rows = evaluate_captions(None, ts, val_scenes, o, 128, oracle=True)
    assert r["BLEU4"] == pytest.approx(1.0) and r["CIDEr"] > 3.0 and r["images"] == 30
    assert rows[0]["caption"] == val_scenes.captions[1][0]


def test_train_transform_packs_every_task(val_scenes):
    from maskconv.data.coco import CocoDetection
    from maskconv.pix2seq.multitask import _swap_left_right

    o, ts = _taskset(val_scenes, max_objects=8, kpt_max_instances=6)
    img, target = CocoDetection(val_scenes, train=True)[0]
    x, row = MultiTaskTrainTransform(128, ts, (1.0, 1.0), hflip=False)(img, target)
    assert x.shape[-2:] == (128, 128)
    seqs = ts.unpack(row[None])
    assert set(seqs) == {"det", "seg", "kpt", "cap"}
    assert seqs["seg"][1].shape == (1, 6, ts.seg.seq_len) and seqs["kpt"][1].shape == (1, 6, ts.kpt.seq_len)
    n = sum(1 for a in val_scenes.gt["annotations"] if a["image_id"] == 1)
    for task, name in (("seg", "instance_segmentation"), ("kpt", "keypoints")):
        inp = seqs[task][0][0]
        assert (inp[:, 0] == TASK_TOKENS[name]).sum() == n and (inp[n:, 0] == 0).all()
    assert ts.cap.decode(seqs["cap"][1])[0] == val_scenes.captions[1][0]  # no dropout on targets
    assert _swap_left_right("a bag at the top left and a shoe at the right.") == \
        "a bag at the top right and a shoe at the left."


def test_keypoints_are_mirrored_and_swapped_on_flip():
    from maskconv.pix2seq.instance import KeypointTokenizer
    from maskconv.pix2seq.multitask import TaskSet
    from maskconv.pix2seq.vocab import Vocab

    v = Vocab(128)
    ts = TaskSet(v, ("kpt",), kpt=KeypointTokenizer(v, 4, max_instances=1, corrupt=False),
                 keypoint_names=("top", "left", "bottom", "right"))
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[..., :32] = 255  # bright left half: tells whether the draw flipped the image
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "image_id": 1,
              "polygons": [[]], "keypoints": torch.tensor([[[20.0, 20.0, 2], [10.0, 30.0, 2], [20.0, 40.0, 1],
                                                           [30.0, 30.0, 0]]])}
    tf = MultiTaskTrainTransform(64, ts, (1.0, 1.0), hflip=True)
    out = {}
    for seed in range(40):
        torch.manual_seed(seed)
        x, row = tf(img, target)
        out[bool(x[0, 0, 0] < x[0, 0, -1])] = ts.unpack(row[None])["kpt"][1][0, 0][5:].view(4, 2)
    plain, flipped = out[False], out[True]
    assert plain[3].eq(INVISIBLE_TOKEN).all() and flipped[1].eq(INVISIBLE_TOKEN).all()  # unlabelled, swapped
    q = lambda t: (t - v.coord_shift).float() / 127 * 64  # noqa: E731  (token -> px)
    assert torch.allclose(q(flipped[3]), torch.tensor([30.0, 64 - 10.0]), atol=0.3)  # old left, mirrored
    assert torch.allclose(q(flipped[0]), torch.tensor([20.0, 64 - 20.0]), atol=0.3)


def test_multitask_loss_is_the_weighted_sum_of_task_losses(val_scenes):
    from maskconv.data.coco import CocoDetection

    o, ts = _taskset(val_scenes, max_objects=8, dim=32, depth=1, heads=4)
    model = build_pix2seq("test_convnextv2", o, 128, 3, ts)
    assert model.decoder.max_len == max(40, ts.seg.seq_len, ts.kpt.seq_len, ts.cap.seq_len)
    tf = MultiTaskTrainTransform(128, ts, (1.0, 1.0))
    ds = CocoDetection(val_scenes, train=True)
    xs, rows = zip(*(tf(*ds[i]) for i in range(2)))
    x, rows = torch.stack(xs), torch.stack(rows)
    model.eval()
    losses = multitask_losses(model, ts, x, rows)
    assert set(losses) == {"det", "seg", "kpt", "cap"} and all(torch.isfinite(v) for v in losses.values())
    # the caption loss equals the single-task computation on its own
    inp, tgt = ts.unpack(rows)["cap"]
    logits = model(x, inp)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none")
    w = ts.cap.weights(tgt).flatten()
    assert torch.allclose(losses["cap"], (ce * w).sum() / (w.sum() + 1e-9), atol=1e-6)


def test_task_options_fail_with_one_line():
    with pytest.raises(ValueError, match="pix2seq.tasks='det,foo'"):
        Pix2SeqOptions(tasks="det,foo")
    with pytest.raises(ValueError, match="pix2seq.task_weights"):
        Pix2SeqOptions(tasks=ALL, task_weights="1,2")


def _cfg(data, out, **kw):
    o = {"model.name": "test_convnextv2", "data.path": str(data), "data.img_size": 64, "data.batch_size": 2,
         "data.num_workers": 0, "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.lr": 1e-3, "run.out": str(out),
         "run.device": "cpu", "run.progress": False, "run.log_every_steps": 1, "run.seed": 3}
    o.update(kw)
    return load_config(overrides=o)


@needs_fmnist
def test_multitask_train_eval_predict_every_task(tmp_path):
    from maskconv.data.scenes import make_scenes

    js = make_scenes(tmp_path / "s", "train", 4, 0, size=64, max_items=2)
    o = Pix2SeqOptions(tasks=ALL, max_objects=3, dim=32, depth=1, heads=4, seg_max_points=12, seg_max_instances=2,
                       kpt_max_instances=2, cap_max_len=24, seg_samples=2)
    res = run_pix2seq_train(_cfg(js.parent, tmp_path / "r"), o)
    assert res.out == tmp_path / "r"
    meta = json.loads((tmp_path / "r/pix2seq.json").read_text())
    assert meta["keypoint_names"] == ["top", "left", "bottom", "right"] and "bag" in meta["words"]
    model, _, o2 = load_pix2seq(tmp_path / "r")
    assert o2.tasks == ALL
    r = run_pix2seq_eval(tmp_path / "r", js.parent, batch_size=2)
    for k in ("AP", "segm_AP50", "segm_det_AP50", "kpt_AP", "kpt_det_AP", "BLEU4", "CIDEr"):
        assert k in r and math.isfinite(r[k])  # reported, a number (not NaN)
    for name in ("predictions.json", "predictions_seg_gt.json", "predictions_kpt_det.json", "predictions_cap.json"):
        assert (tmp_path / "r/eval" / name).is_file()
    img = js.parent / "images" / "train_000000.png"
    for task in ("det", "seg", "kpt", "cap"):
        rows = run_pix2seq_predict(tmp_path / "r", img, tmp_path / f"{task}.json", tmp_path / f"{task}.png",
                                   threshold=0.0, task=task)
        assert (tmp_path / f"{task}.png").is_file()
        if task == "cap":
            assert len(rows) == 1 and isinstance(rows[0]["caption"], str)
        elif rows and task == "kpt":
            assert len(rows[0]["keypoints"]) == 4
        elif rows and task == "seg":
            assert "counts" in rows[0]["segmentation"]


@needs_fmnist
def test_tasks_without_data_are_refused(tmp_path):
    from tests.data.test_coco import write_coco

    root = write_coco(tmp_path / "c")
    with pytest.raises(ValueError, match="no captions"):
        run_pix2seq_train(_cfg(root, tmp_path / "r"), Pix2SeqOptions(tasks="det,cap"))
    with pytest.raises(ValueError, match="declares 'keypoints'"):
        run_pix2seq_train(_cfg(root, tmp_path / "r"), Pix2SeqOptions(tasks="det,kpt"))
    with pytest.raises(ValueError, match="polygon segmentation"):
        run_pix2seq_train(_cfg(root, tmp_path / "r"), Pix2SeqOptions(tasks="det,seg"))


@pytest.mark.parametrize("seed", range(6))
def test_points_follow_the_boxes_through_jitter_crop_and_flip(seed):
    from maskconv.data.coco import DetectionTrainTransform

    torch.manual_seed(seed)
    img = torch.zeros(3, 50, 70, dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 6.0, 30.0, 40.0], [40.0, 10.0, 66.0, 45.0]])
    corners = boxes.view(-1, 2)  # (x0, y0), (x1, y1) of each box
    _, t = DetectionTrainTransform(48, (0.5, 1.5))(img, {"boxes": boxes, "labels": torch.tensor([1, 2]),
                                                          "points": corners})
    b = t["boxes"]
    p = t["points"].view(-1, 2, 2)[t["keep"]]  # per box: its two moved corners
    xs, ys = p[..., 0].sort(-1).values, p[..., 1].sort(-1).values
    cw, ch = t["unpadded_size"][1], t["unpadded_size"][0]
    assert torch.allclose(xs.clamp(0, cw), b[:, [0, 2]], atol=1e-4)  # boxes are clipped to the crop, points not
    assert torch.allclose(ys.clamp(0, ch), b[:, [1, 3]], atol=1e-4)


def well_formed(task: str, seq: list[int], ts) -> bool:
    """Whether a generated response has the grammar of ``task`` (what its prompt asked for)."""
    v = ts.vocab
    coord = lambda t: v.coord_shift <= t < v.coord_shift + v.bins  # noqa: E731
    if task == "det":  # [y0 x0 y1 x1 class] first; later slots may be noise, whose coordinates have weight 0
        return len(seq) % 5 == 0 and all(coord(t) for t in seq[:4]) and 100 <= seq[4] < v.coord_shift
    if task == "seg":  # coordinate pairs (separators between parts), then padding
        body = seq[:seq.index(0)] if 0 in seq else seq
        return len(body) >= 6 and len(body) % 2 == 0 and all(coord(t) or t == 40 for t in body)
    if task == "kpt":  # one (y, x) pair per keypoint
        return len(seq) == ts.kpt.response_len and all(coord(t) or t == 41 for t in seq)
    body = seq[:seq.index(ts.cap.eos)] if ts.cap.eos in seq else None  # words, then the end token
    return bool(body) and all(t >= v.text_shift for t in body)


@pytest.mark.slow
@needs_fmnist
def test_multitask_model_learns_scenes_on_every_task_and_prompts_select_the_task(tmp_path):
    """4 scenes (1-2 items, 64 px), one model, 500 steps of all four tasks: each task learns its scenes, and the
    same image answers each prompt with that task's output. Detection is the exception at this size: in five runs
    (64 or 128 wide, 250-1000 steps, detection weighted 1 or 3) segmentation, keypoints and captions reached 1.0
    while detection's AP50 stayed at 0.50-0.86 (the second object of a scene is missed, duplicated or taken from
    another scene), where the same model trained on detection alone reaches 1.0 in 500 steps (BENCHMARKS.md).
    Its gate here (0.5) checks that it learns, not that it overfits."""
    from maskconv.data.scenes import make_scenes
    from maskconv.pix2seq.instance import instance_prompt
    from maskconv.pix2seq.task import evaluate_tasks, taskset_from_meta

    js = make_scenes(tmp_path / "s", "train", 4, 0, size=64, max_items=2)
    o = Pix2SeqOptions(tasks=ALL, max_objects=3, dim=64, depth=2, heads=4, drop=0.0, drop_path=0.0, jitter_min=1.0,
                       jitter_max=1.0, hflip=False, seg_max_points=16, seg_max_instances=2, kpt_max_instances=2,
                       cap_max_len=24)
    cfg = _cfg(js.parent, tmp_path / "r", **{"model.stem_stride": 2, "data.batch_size": 4, "optim.epochs": 500,
                                             "optim.warmup_epochs": 1, "optim.lr": 3e-3, "optim.weight_decay": 0.0,
                                             "run.log_every_steps": 50, "run.save_every_epochs": 100000})
    res = run_pix2seq_train(cfg, o)
    ts = taskset_from_meta(json.loads((tmp_path / "r/pix2seq.json").read_text()), o)
    data = load_coco(js)
    r = evaluate_tasks(res.model, ts, data, o, 64, 3, 4)
    assert r["segm_AP50"] >= 0.95 and r["kpt_AP"] >= 0.95 and r["BLEU4"] >= 0.95 and r["AP50"] >= 0.5, r
    # prompts select the task: one image, four prompts, four grammars (greedy decoding)
    from maskconv.pix2seq.task import eval_batches

    model = res.model.eval()
    images, targets = next(eval_batches(data, 64, 3, 1))
    mem = model.encode(images)
    box = targets[0]["boxes"][:1, [1, 0, 3, 2]] / 64
    outs = {}
    for task, name in (("det", "detection"), ("cap", "captioning")):
        seq, _ = model.generate(None, torch.tensor([[TASK_TOKENS[name]]]), ts.tokenizer(task).seq_len, greedy=True,
                                memory=mem)
        outs[task] = seq[0].tolist()
    for task, name in (("seg", "instance_segmentation"), ("kpt", "keypoints")):
        prompt = instance_prompt(name, box, targets[0]["labels"][:1], ts.vocab)
        seq, _ = model.generate(None, prompt, ts.tokenizer(task).response_len, greedy=True, memory=mem)
        outs[task] = seq[0].tolist()
    for task, seq in outs.items():
        assert well_formed(task, seq, ts), (task, seq)
        assert not any(well_formed(other, seq, ts) for other in outs if other not in (task, "kpt", "seg")), task
    assert ts.cap.decode(torch.tensor([outs["cap"]]))[0] == data.captions[1][0]


def test_grammar_check_tells_the_tasks_apart(val_scenes):
    """The checker the prompt-selection test relies on accepts each task's ground truth and rejects the others'."""
    from maskconv.data.coco import CocoDetection

    o, ts = _taskset(val_scenes, max_objects=8)
    img, target = CocoDetection(val_scenes, train=True)[0]
    seqs = ts.unpack(MultiTaskTrainTransform(128, ts, (1.0, 1.0), hflip=False)(img, target)[1][None])
    resp = {"det": seqs["det"][1][0].tolist(), "seg": seqs["seg"][1][0, 0, 5:].tolist(),
            "kpt": seqs["kpt"][1][0, 0, 5:].tolist(), "cap": seqs["cap"][1][0].tolist()}
    for task, seq in resp.items():
        assert well_formed(task, seq, ts)
        assert [t for t in resp if well_formed(t, seq, ts)] in ([task], [task, "kpt"], ["seg", task]), task


LABELME = "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/annotations.json"


@pytest.mark.skipif(not __import__("os").path.isfile(LABELME), reason="Debian package labelme-examples not installed")
def test_oracle_segm_ap_one_on_real_photos_with_multipart_polygons():
    """labelme's COCO file: real photos, multi-part polygons (2 and 4 parts), a category id 0 and ids from 0."""
    data = load_coco(LABELME)
    o = Pix2SeqOptions(tasks="seg", bins=1000)
    ts = build_taskset(o, 512)
    res, _ = evaluate_instance_task("seg", None, ts, data, o, 512, oracle=True)
    assert res["AP"] == pytest.approx(1.0) and res["detections"] == 12
    multi = [a for a in data.gt["annotations"] if len(a["segmentation"]) == 4][0]
    _, tgt = ts.seg.encode(torch.zeros(1, 4), torch.ones(1, dtype=torch.long),
                           [[torch.tensor(p).view(-1, 2)[:, [1, 0]].numpy() / 512 for p in multi["segmentation"]]],
                           train=False)
    assert tgt[0].tolist().count(40) == 2 * 3  # 4 parts: 3 separator pairs


def test_detection_alone_trains_on_the_detection_loss(val_scenes):
    """With tasks=det the packed row is (input, target) of detection and the loss is its weighted CE, as before."""
    from maskconv.data.coco import CocoDetection

    o = Pix2SeqOptions(max_objects=8, dim=32, depth=1, heads=4)
    ts = build_taskset(o, 128)
    model = build_pix2seq("test_convnextv2", o, 128, 3, ts).eval()
    assert model.decoder.max_len == 40 and model.decoder.vocab_size == ts.det.vocab.size
    tf = MultiTaskTrainTransform(128, ts, (1.0, 1.0))
    xs, rows = zip(*(tf(*CocoDetection(val_scenes, train=True)[i]) for i in range(2)))
    x, y = torch.stack(xs), torch.stack(rows)
    inp, tgt = y.chunk(2, 1)
    ce = torch.nn.functional.cross_entropy(model(x, inp).flatten(0, 1), tgt.flatten(), reduction="none")
    w = ts.det.weights(tgt).flatten()
    assert torch.allclose(multitask_losses(model, ts, x, y)["det"], (ce * w).sum() / (w.sum() + 1e-9), atol=1e-6)


def test_drawn_captions_keep_every_word(tmp_path):
    """A caption picture must show the whole caption: the strip below each image grows with its lines (it used to
    keep three lines of 42 characters and cut the rest)."""
    from PIL import Image

    from maskconv.pix2seq.task import _draw

    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    short, long = "one item: a bag.", " ".join(["a large sneaker at the middle right,"] * 6)
    heights = []
    for i, cap in enumerate((short, long)):
        _draw([(img, [], cap)], ["bag"], tmp_path / f"{i}.png")
        heights.append(Image.open(tmp_path / f"{i}.png").height)
    lines = -(-len(long) // 42)  # at least this many wrapped lines
    assert heights[1] - heights[0] >= 13 * (lines - 1)
