"""Caption metrics (BLEU-4, CIDEr-D) and COCO result records for masks and keypoints.

BLEU and CIDEr-D are written here rather than taken from ``pycocoevalcap`` (the COCO caption scripts): that
package is 104 MB of Java jars (METEOR, SPICE, CoreNLP) around two small Python scorers, and the official
Pix2Seq code leaves caption scores to it. Both follow their papers and the COCO scorers' conventions:

* BLEU-4 (Papineni et al., ACL 2002): corpus level, clipped n-gram counts summed over all candidates,
  geometric mean of the 1..4-gram precisions, brevity penalty with the closest reference length (ties: the
  shorter), no smoothing (a corpus with no matching 4-gram scores 0).
* CIDEr-D (Vedantam et al., CVPR 2015, the "-D" variant of the COCO scorer): per n in 1..4, TF-IDF vectors of
  n-gram counts, idf = log(#images) - log(max(1, #images whose references hold the n-gram)); the similarity to
  each reference is the candidate's counts clipped by the reference's, dotted with the reference, over both
  norms, times a Gaussian length penalty exp(-(len_c - len_r)^2 / (2 * 6^2)); averaged over n and references,
  times 10, then averaged over images.

Sentences are compared as lists of lower-cased words without punctuation (``caption_words``), as the COCO
scripts' tokenizer leaves them.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .caption import split_words

__all__ = ["caption_words", "bleu4", "cider_d", "mask_result", "keypoint_result"]


def caption_words(text: str) -> list[str]:
    return [w for w in split_words(text.lower()) if any(c.isalnum() for c in w)]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 of tokenized ``candidates[i]`` against ``references[i]`` (a list of tokenized sentences)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    matched, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        for n in range(1, 5):
            c = _ngrams(cand, n)
            best: Counter = Counter()
            for r in refs:
                best |= _ngrams(r, n)  # the most times the n-gram appears in any one reference
            matched[n - 1] += sum(min(k, best[g]) for g, k in c.items())
            total[n - 1] += max(0, len(cand) - n + 1)
        cand_len += len(cand)
        ref_len += min((len(r) for r in refs), key=lambda L: (abs(L - len(cand)), L))
    if min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return bp * math.exp(log_p)


def _tfidf(words: list[str], df: Counter, log_n: float):
    """Per n: {n-gram: tf * idf}, its norm; and the sentence length."""
    vecs, norms = [], []
    for n in range(1, 5):
        v = {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in _ngrams(words, n).items()}
        vecs.append(v)
        norms.append(math.sqrt(sum(x * x for x in v.values())))
    return vecs, norms, len(words)


def cider_d(candidates: list[list[str]], references: list[list[list[str]]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (mean over images) of tokenized ``candidates`` against their ``references``; document
    frequencies come from the references of this corpus, as in the COCO scorer."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    df: Counter = Counter()
    for refs in references:
        df.update({g for r in refs for n in range(1, 5) for g in _ngrams(r, n)})
    log_n = math.log(float(len(references)))
    scores = []
    for cand, refs in zip(candidates, references):
        vc, nc, lc = _tfidf(cand, df, log_n)
        total = 0.0
        for r in refs:
            vr, nr, lr = _tfidf(r, df, log_n)
            sims = []
            for n in range(4):
                val = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                val = val / (nc[n] * nr[n]) if nc[n] and nr[n] else val
                sims.append(val * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2)))
            total += sum(sims) / 4
        scores.append(10.0 * total / len(refs))
    return float(np.mean(scores))


def mask_result(mask: np.ndarray, image_id: int, category_id: int, score: float) -> dict:
    """A (h, w) bool mask -> a COCO ``segm`` result (RLE, as the official code submits; bbox from the mask)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle, "bbox": bbox,
            "score": float(score)}


def keypoint_result(points_xy: np.ndarray, image_id: int, category_id: int, score: float) -> dict:
    """(K, 2) x, y pixels -> a COCO ``keypoints`` result (every point marked visible: OKS ignores the flag)."""
    kps = np.concatenate([np.asarray(points_xy, np.float64), np.ones((len(points_xy), 1))], 1)
    return {"image_id": image_id, "category_id": category_id, "keypoints": kps.reshape(-1).tolist(),
            "score": float(score)}
