"""Pix2Seq v2 task formats: instance segmentation, keypoints, captioning (round trips, official transcriptions)."""
import json

import numpy as np
import pytest
import torch

from maskconv.data.coco import CocoFormatError, load_coco
from maskconv.pix2seq.caption import CaptionTokenizer, WordVocab, join_words, split_words
from maskconv.pix2seq.instance import (INVISIBLE_FLOAT, KeypointTokenizer, SegmentationTokenizer, cap_polygon,
                                       flip_pairs, instance_prompt, points_to_tokens, simplify_ring)
from maskconv.pix2seq.vocab import INVISIBLE_TOKEN, SEPARATOR_TOKEN, Vocab
from tests.data.test_coco import write_coco


def official_instance_transcription(task_id, bbox, label, points, bins, shift, max_seq_len, eos_w, inv_w=None):
    """numpy transcription of google-research/pix2seq tasks/task_utils.py build_instance_prompt_seq +
    build_instance_response_seq_from_points and the preprocess_batched of tasks/instance_segmentation.py
    (inv_w None) / tasks/keypoint_detection.py (inv_w set; without the random input masking)."""
    q = lambda v: np.clip(np.round(v * (bins - 1)).astype(np.int64), 0, bins - 1)  # noqa: E731
    is_pad = (label == 0)[..., None]
    prompt = np.concatenate([np.full_like(label[..., None], task_id), q(bbox) + shift, (label + 100)[..., None]], -1)
    prompt = np.where(is_pad, 0, prompt)
    resp = q(points) + shift
    for f, t in ((-1.0, 0), (-2.0, 40), (-3.0, 41)):
        resp = np.where(points == f, t, resp)
    resp = np.where(is_pad, 0, resp)
    seq = np.concatenate([prompt, resp], -1)
    seq = np.concatenate([seq, np.zeros(seq.shape[:-1] + (max_seq_len + 1 - seq.shape[-1],), np.int64)], -1)
    inp, tgt = seq[..., :-1], seq[..., 1:]
    w = np.concatenate([np.zeros_like(prompt)[..., :-1], np.ones_like(resp)], -1).astype(np.float32)
    if inv_w is not None:
        w = np.where(tgt[..., :w.shape[-1]] == 41, inv_w, w)
    w = np.where(~is_pad, w, 0.0)
    w = np.concatenate([w, np.zeros(w.shape[:-1] + (max_seq_len - w.shape[-1],), np.float32)], -1)
    w = np.where(tgt == 0, eos_w, w)
    return inp, tgt, w


def _square(y, x, s):
    return np.array([[y, x], [y, x + s], [y + s, x + s], [y + s, x]], np.float64)


def test_segmentation_sequences_equal_official_transcription():
    v = Vocab(256)
    tok = SegmentationTokenizer(v, max_instances=3, max_points=8)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.3, 0.25]])
    labels = torch.tensor([4, 1])
    polys = [[_square(0.1, 0.2, 0.3)], [_square(0.0, 0.0, 0.1), np.array([[0.2, 0.2], [0.25, 0.2], [0.25, 0.1]])]]
    inp, tgt = tok.encode(boxes, labels, polys, train=False)
    pts = np.full((3, 16), -1.0, np.float32)
    pts[0, :8] = polys[0][0].reshape(-1)
    pts[1, :8] = polys[1][0].reshape(-1)
    pts[1, 8:10] = -2.0
    pts[1, 10:16] = polys[1][1].reshape(-1)
    bb = np.zeros((3, 4), np.float32)
    bb[:2] = boxes.numpy()
    lab = np.array([4, 1, 0])
    ei, et, ew = official_instance_transcription(11, bb, lab, pts, 256, 1000, tok.seq_len, 1.0)
    assert inp.tolist() == ei.tolist() and tgt.tolist() == et.tolist()
    assert torch.allclose(tok.weights(tgt), torch.from_numpy(ew))
    assert tgt[1].tolist().count(SEPARATOR_TOKEN) == 2  # one separator pair between the parts


@pytest.mark.parametrize("inv_w, eos_w", [(0.1, 0.0), (0.5, 0.2)])
def test_keypoint_sequences_equal_official_transcription(inv_w, eos_w):
    v = Vocab(1000)
    tok = KeypointTokenizer(v, num_keypoints=4, max_instances=2, invisible_token_weight=inv_w, eos_token_weight=eos_w)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    kps = torch.tensor([[[0.1, 0.3, 2], [0.3, 0.2, 1], [0.0, 0.0, 0], [0.4, 0.6, 2]]])
    inp, tgt = tok.encode(boxes, torch.tensor([2]), kps, train=False)
    pts = np.full((2, 8), -1.0, np.float32)
    pts[0] = [0.1, 0.3, 0.3, 0.2, -3, -3, 0.4, 0.6]
    bb = np.zeros((2, 4), np.float32)
    bb[0] = boxes[0].numpy()
    ei, et, ew = official_instance_transcription(12, bb, np.array([2, 0]), pts, 1000, 1000, tok.seq_len, eos_w, inv_w)
    assert inp.tolist() == ei.tolist() and tgt.tolist() == et.tolist()
    assert torch.allclose(tok.weights(tgt), torch.from_numpy(ew))
    assert tgt[0].tolist().count(INVISIBLE_TOKEN) == 2  # the unlabelled point kept, as an invisible pair


def test_keypoint_input_corruption_only_touches_response_inputs():
    tok = KeypointTokenizer(Vocab(256), num_keypoints=4, max_instances=1)
    kps = torch.tensor([[[0.1, 0.3, 2], [0.3, 0.2, 2], [0.2, 0.2, 2], [0.4, 0.6, 2]]])
    clean, tgt0 = tok.encode(torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.tensor([1]), kps, train=False)
    changed = torch.zeros_like(clean, dtype=torch.bool)
    for s in range(30):
        torch.manual_seed(s)
        inp, tgt = tok.encode(torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.tensor([1]), kps, train=True)
        assert torch.equal(tgt, tgt0) and torch.equal(inp[:, :6], clean[:, :6])
        diff = inp != clean
        assert (inp[diff] == INVISIBLE_TOKEN).all()
        changed |= diff
    assert changed[:, 6:].all()  # every response input is corrupted at some ratio


def test_polygon_round_trip_within_half_a_bin_and_separators():
    v = Vocab(256)
    tok = SegmentationTokenizer(v, max_instances=2, max_points=20)
    g = np.random.default_rng(0)
    parts = [g.uniform(0, 1, (6, 2)), g.uniform(0, 1, (4, 2)), g.uniform(0, 1, (5, 2))]  # 15 + 2 separators
    _, tgt = tok.encode(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([3]), [parts], train=False)
    back = tok.decode(tgt[:1, 5:])[0]
    assert [len(p) for p in back] == [6, 4, 5]
    for a, b in zip(parts, back):
        assert np.abs(a - b).max() <= 0.5 / 255 + 1e-6


def test_capped_polygon_is_douglas_peucker_of_its_vertices():
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    r = np.where(np.arange(200) % 40 == 0, 0.4, 0.3)  # 5 radial spikes: corners a simplification must keep
    ring = np.stack([0.5 + r * np.sin(t), 0.5 + r * np.cos(t)], 1)
    capped = cap_polygon([ring], 32, 0.5 / 255)[0]
    assert 3 <= len(capped) <= 32
    rows = {tuple(r) for r in ring.round(9)}
    assert all(tuple(r) in rows for r in capped.round(9))  # a subset of the true vertices
    assert all(tuple(r) in {tuple(c) for c in capped.round(9)} for r in ring[::40].round(9))
    # an unchanged polygon under the cap; a square's corners survive any tolerance
    assert np.array_equal(cap_polygon([ring[:10]], 32, 0.01)[0], ring[:10])
    assert len(simplify_ring(_square(0, 0, 1), 0.3)) == 4
    # many parts: the smallest ones go when 3 points each still do not fit
    many = [_square(0.1 * i, 0, 0.01 * (i + 1)) for i in range(8)]
    kept = cap_polygon(many, 12, 0.001)
    assert sum(len(p) for p in kept) + len(kept) - 1 <= 12 and len(kept) == 3
    for k, sq in zip(kept, many[-3:]):  # the three largest survive, each as a subset of its vertices
        assert {tuple(r) for r in k.round(9)} <= {tuple(r) for r in sq.round(9)}


def test_keypoint_decode_suppresses_invisible_and_fills_box_centre():
    v = Vocab(64)
    tok = KeypointTokenizer(v, num_keypoints=2)
    resp = torch.tensor([[v.coord_shift + 10, v.coord_shift + 20, INVISIBLE_TOKEN, INVISIBLE_TOKEN]])
    logits = torch.full((1, 4, v.size), -30.0)
    logits[0, torch.arange(4), resp[0]] = 10.0
    logits[0, 2, v.coord_shift + 5] = 9.0  # the runner-up where invisible was sampled
    logits[0, 3, v.coord_shift + 6] = 9.0
    box = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    pts, score = tok.decode(logits, resp, box, top_p=0.1)
    assert torch.allclose(pts[0, 0], torch.tensor([10 / 63, 20 / 63]))
    assert torch.allclose(pts[0, 1], torch.tensor([5 / 63, 6 / 63]))  # resampled without the invisible token
    pts, _ = tok.decode(logits, resp, box, suppress_invisible=False)
    assert torch.allclose(pts[0, 1], torch.tensor([0.4, 0.6]))  # no suppression: the box centre
    assert 0.99 < float(score) <= 1.0


def test_flip_pairs_swap_left_and_right():
    assert flip_pairs(["top", "left", "bottom", "right"]) == [0, 3, 2, 1]
    assert flip_pairs(["nose", "left_eye", "right_eye"]) == [0, 2, 1]


def test_prompt_and_padding_rows_are_zero():
    v = Vocab(128)
    p = instance_prompt("keypoints", torch.tensor([[0.1, 0.1, 0.2, 0.2], [0, 0, 0, 0]]), torch.tensor([5, 0]), v)
    assert p[0, 0] == 12 and p[0, 5] == 105 and p[1].eq(0).all()
    r = points_to_tokens(torch.tensor([[INVISIBLE_FLOAT, 0.5], [0.1, 0.1]]), torch.tensor([1, 0]), v)
    assert r[0, 0] == INVISIBLE_TOKEN and r[1].eq(0).all()


def test_caption_round_trip_exact_with_end_token_and_dropout():
    caps = ["three items: a small t-shirt/top at the top left, a large bag at the centre and a small sneaker at "
            "the bottom right.", "an empty canvas."]
    words = WordVocab.build(caps)
    for c in caps:
        assert join_words(split_words(c)) == c
    tok = CaptionTokenizer(Vocab(128, text_size=len(words)), words, max_len=40)
    for c in caps:
        inp, tgt = tok.encode(c, train=False)
        assert tgt.tolist().count(tok.eos) == 1 and inp[0] == 13
        assert tok.decode(tgt[None])[0] == c
        w = tok.weights(tgt)
        assert w[tgt == tok.eos].item() == pytest.approx(0.1) and (w[tgt != tok.eos] == 1).all()
    torch.manual_seed(0)
    inp, tgt = tok.encode(caps[0], train=True)
    dropped = (inp == 30).float().mean()
    assert 0.3 < dropped < 0.7 and tok.decode(tgt[None])[0] == caps[0]
    with pytest.raises(ValueError, match="text tokens"):
        CaptionTokenizer(Vocab(128, text_size=3), words)
    assert words.decode(words.encode("a purple bag")) == "a <unk> bag"


def test_an_image_without_a_caption_weighs_nothing_while_the_empty_caption_does():
    # no caption is not the caption "": the first teaches nothing, the second teaches the end token
    words = WordVocab.build(["a bag."])
    tok = CaptionTokenizer(Vocab(128, text_size=len(words)), words, max_len=8)
    inp, tgt = tok.encode_missing()
    assert inp[0] == 13 and inp.shape == tgt.shape == (8,) and tok.weights(tgt).sum().item() == 0
    _, empty = tok.encode("", train=False)
    assert tok.weights(empty).sum().item() > 0
    both = torch.stack([tgt, tok.encode("a bag.", train=False)[1]])  # one row of each in a batch
    w = tok.weights(both)
    assert w[0].sum().item() == 0 and w[1].sum().item() > 0


@pytest.mark.parametrize("field, value, expect", [
    ("segmentation", [[1, 2, 3, 4]], "segmentation part 0 has 4 numbers"),
    ("segmentation", [[1, 2, 3, 4, 5, 6, 7]], "segmentation part 0 has 7 numbers"),
    ("segmentation", {"counts": "x", "size": [3, 4]}, "RLE segmentation on a non-crowd"),
    ("segmentation", [["a", 1, 2, 3, 4, 5]], "segmentation part 0 is not a list of numbers"),
    ("keypoints", [1, 2, 2, 3, 4], "5 keypoint numbers"),
    ("keypoints", [1, 2, 2, 3, 4, 7], "keypoint visibility 7"),
])
def test_malformed_polygons_and_keypoints_name_file_and_entry(tmp_path, field, value, expect):
    root = write_coco(tmp_path / "c")
    js = root / "annotations.json"
    raw = json.loads(js.read_text())
    for c in raw["categories"]:
        c["keypoints"] = ["left", "right"]
    raw["annotations"][3][field] = value
    js.write_text(json.dumps(raw))
    with pytest.raises(CocoFormatError) as e:
        load_coco(root)
    msg = str(e.value)
    assert str(js) in msg and "annotations[3] (id 3)" in msg and expect in msg and "\n" not in msg


def test_keypoints_without_names_and_bad_captions_are_refused(tmp_path):
    root = write_coco(tmp_path / "c")
    js = root / "annotations.json"
    raw = json.loads(js.read_text())
    raw["annotations"][0]["keypoints"] = [1, 2, 2]
    js.write_text(json.dumps(raw))
    with pytest.raises(CocoFormatError, match=r"annotations\[0\].*declares no 'keypoints'"):
        load_coco(root)
    del raw["annotations"][0]["keypoints"]
    raw["captions"] = [{"image_id": 0, "caption": "fine"}, {"image_id": 99, "caption": "lost"}]
    js.write_text(json.dumps(raw))
    with pytest.raises(CocoFormatError, match=r"captions\[1\]: image_id 99"):
        load_coco(root)
    raw["captions"] = raw["captions"][:1]
    js.write_text(json.dumps(raw))
    assert load_coco(root).captions == {1: ["fine"], 2: [], 3: []}


def test_task_loss_weights_are_built_on_the_targets_device():
    # no host round trip per step (issue 17): the weights follow the target's device ('meta' stands in for a GPU)
    from maskconv.pix2seq.instance import instance_token_weights

    words = WordVocab.build(["a bag."])
    tok = CaptionTokenizer(Vocab(128, text_size=len(words)), words, max_len=8)
    tgt = tok.encode("a bag.", train=False)[1][None]
    assert tok.weights(tgt.to("meta")).device.type == "meta"
    assert instance_token_weights(tgt.to("meta"), 0.1, 0.5).device.type == "meta"
