import numpy as np
import pytest
import torch

from maskconv.pix2seq import DetectionTokenizer, Vocab, build_detection_sequences, noise_boxes
from maskconv.pix2seq.vocab import FAKE_LABEL


def official_transcription(bbox, label, bins, noise_bbox_weight, coord_vocab_shift, eos_token_weight, max_seq_len):
    """numpy transcription of google-research/pix2seq tasks/object_detection.py build_response_seq_from_bbox
    (class_label_corruption='none') + TaskObjectDetection.preprocess_batched, vocab.py constants inline."""
    is_padding = (label == 0)[..., None]
    q = np.clip(np.round(bbox * (bins - 1)).astype(np.int64), 0, bins - 1) + coord_vocab_shift
    q = np.where(is_padding, 0, q)
    new_label = np.where(is_padding, 0, (label + 100)[..., None])
    response_seq = np.concatenate([q, new_label], -1).reshape(label.shape[0], -1)
    is_real = (new_label != 30).astype(np.float32)
    token_weights = np.concatenate([np.tile(is_real, [1, 1, 4]), is_real + (1 - is_real) * noise_bbox_weight], -1)
    token_weights = token_weights.reshape(label.shape[0], -1)
    prompt = np.full((label.shape[0], 1), 10)
    input_seq = np.concatenate([prompt, response_seq], -1)  # response_seq_cm == response_seq without corruption
    target_seq = np.concatenate([prompt, response_seq], -1)
    pad = lambda s, n: np.concatenate([s, np.zeros((s.shape[0], n - s.shape[1]), s.dtype)], -1)  # noqa: E731
    input_seq, target_seq = pad(input_seq, max_seq_len + 1)[:, :-1], pad(target_seq, max_seq_len + 1)[:, 1:]
    token_weights = pad(token_weights, max_seq_len)
    token_weights = np.where(target_seq == 0, eos_token_weight, token_weights)
    return input_seq, target_seq, token_weights


def _fixed_inputs():
    g = np.random.default_rng(0)
    y0, x0 = g.uniform(0, 0.6, (2, 6, 1)), g.uniform(0, 0.6, (2, 6, 1))
    bbox = np.concatenate([y0, x0, y0 + g.uniform(0.05, 0.4, (2, 6, 1)), x0 + g.uniform(0.05, 0.4, (2, 6, 1))], -1)
    bbox[0, 0] = [0.0, 0.5 / 255, 1.0, 1.5 / 255]  # exact halves: round-half-even in both
    label = np.array([[3, 1, FAKE_LABEL, FAKE_LABEL, 0, 0], [7, FAKE_LABEL, 2, 0, 0, 0]])
    return bbox.astype(np.float32), label


@pytest.mark.parametrize("bins, w_noise, w_eos", [(256, 1.0, 0.1), (1000, 0.5, 0.0)])
def test_sequences_equal_official_transcription(bins, w_noise, w_eos):
    bbox, label = _fixed_inputs()
    ref = official_transcription(bbox, label, bins, w_noise, 1000, w_eos, 5 * label.shape[1])
    got = build_detection_sequences(torch.from_numpy(bbox), torch.from_numpy(label), Vocab(bins), "none",
                                    w_noise, w_eos)
    for r, g, name in zip(ref, got, ("input", "target", "weights")):
        assert g.shape == r.shape, name
        np.testing.assert_array_equal(g.numpy(), r.astype(g.numpy().dtype), err_msg=name)


def test_class_corruption_touches_input_classes_only():
    bbox, label = _fixed_inputs()
    label = np.where(label == 0, 5, label)  # no padding: every class slot is corrupted
    torch.manual_seed(0)
    inp, tgt, w = build_detection_sequences(torch.from_numpy(bbox).repeat(50, 1, 1),
                                            torch.from_numpy(label).repeat(50, 1), Vocab(256), "rand_n_fake_cls")
    ref_inp, ref_tgt, _ = build_detection_sequences(torch.from_numpy(bbox).repeat(50, 1, 1),
                                                    torch.from_numpy(label).repeat(50, 1), Vocab(256), "none")
    assert torch.equal(tgt, ref_tgt)
    coord = torch.ones_like(inp, dtype=torch.bool)
    coord[:, 5::5] = False  # input positions holding a class token (shifted right by the prompt)
    assert torch.equal(inp[coord], ref_inp[coord])
    cls_in = inp[:, 5::5]
    fake = (cls_in == 30).float().mean().item()
    assert 0.4 < fake < 0.6 and ((cls_in == 30) | ((cls_in >= 100) & (cls_in < 1000))).all()


def test_round_trip_within_half_a_bin_and_exact_classes():
    vocab = Vocab(256)
    tok = DetectionTokenizer(vocab, max_objects=10)
    g = torch.Generator().manual_seed(1)
    yx0 = torch.rand(7, 2, generator=g) * 0.7
    boxes = torch.cat([yx0, yx0 + 0.05 + torch.rand(7, 2, generator=g) * 0.25], 1)
    labels = torch.randint(1, 11, (7,), generator=g)
    inp, tgt = tok.encode(boxes, labels, train=False)
    assert inp[0] == 10 and torch.equal(inp[1:], tgt[:-1])
    out_boxes, out_cls, score = tok.decode(tok.oracle_logits(tgt[None]), tgt[None])
    assert (out_boxes[0, :7] - boxes).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(out_cls[0, :7], labels) and (score[0, :7] > 0.99).all()
    assert (out_cls[0, 7:] == 0).all()  # padding slots: no class


def test_training_sequence_holds_noise_boxes_and_no_end_token():
    tok = DetectionTokenizer(Vocab(256), max_objects=20)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.3], [0.5, 0.5, 0.9, 0.8], [0.2, 0.6, 0.3, 0.9]])
    labels = torch.tensor([4, 2, 9])
    torch.manual_seed(3)
    inp, tgt = tok.encode(boxes, labels, train=True)
    cls = tgt[4::5]
    assert sorted((cls[:3] - 100).tolist()) == [2, 4, 9] and (cls[3:] == 30).all()  # real first, then fakes
    assert (tgt != 0).all()  # filled to max_objects: the end token never appears
    w = tok.weights(tgt[None])[0].view(20, 5)
    assert (w[:3] == 1).all() and (w[3:, :4] == 0).all() and (w[3:, 4] == 1).all()
    real = tok.vocab.dequantize(tgt.view(20, 5)[:3, :4])
    assert {tuple(r) for r in torch.round(real * 255).int().tolist()} == \
        {tuple(r) for r in torch.round(boxes * 255).int().tolist()}  # a permutation of the real objects


def test_noise_boxes_duplicates_stay_near_their_source():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.5]])
    near = 0
    for _ in range(200):
        nb = noise_boxes(boxes, 4)
        assert nb.shape == (4, 4) and (nb >= 0).all() and (nb <= 1).all()
        near += ((nb - boxes).abs().max(1).values <= 2 * 0.05 * 0.4 + 1e-6).sum().item()
    # about half of the noise are duplicates (dup count ~ U{0..4}): each within 2 std of its source
    assert 250 < near < 550
    assert noise_boxes(torch.zeros(0, 4), 5).shape == (5, 4)  # no real box: all random
