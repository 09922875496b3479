"""BLEU-4 and CIDEr-D against published and hand-worked examples; nltk as an independent BLEU where installed."""
import math
import random

import pytest

from maskconv.pix2seq.metrics import bleu4, caption_words, cider_d

# The worked example of the BLEU paper (Papineni et al. 2002, candidate 1 and its three references), as used in
# nltk's documentation of sentence_bleu / corpus_bleu, with the scores that documentation prints.
HYP1 = ("It is a guide to action which ensures that the military always obeys the commands of the party").split()
REF1A = ("It is a guide to action that ensures that the military will forever heed Party commands").split()
REF1B = ("It is the guiding principle which guarantees the military forces always being under the command of "
         "the Party").split()
REF1C = ("It is the practical guide for the army always to heed the directions of the party").split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()


def test_bleu_equals_the_published_worked_examples():
    assert bleu4([HYP1], [[REF1A, REF1B, REF1C]]) == pytest.approx(0.5045666840058485, abs=1e-12)
    assert bleu4([HYP1, HYP2], [[REF1A, REF1B, REF1C], [REF2A]]) == pytest.approx(0.5920778868801042, abs=1e-12)


def test_bleu_edge_cases():
    assert bleu4([["a", "b", "c", "d"]], [[["a", "b", "c", "d"]]]) == pytest.approx(1.0)
    assert bleu4([["a", "b", "c"]], [[["a", "b", "c"]]]) == 0.0  # no 4-gram at all: unsmoothed BLEU-4 is 0
    short = bleu4([list("abcde")], [[list("abcdefgh")]])
    assert short == pytest.approx(math.exp(1 - 8 / 5))  # precisions 1, brevity penalty only
    with pytest.raises(ValueError, match="candidates"):
        bleu4([["a"]], [])


def test_bleu_equals_nltk_on_random_corpora():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(0)
    words = "a the cat dog sat on mat red blue big".split()
    for _ in range(20):
        cands = [[rng.choice(words) for _ in range(rng.randint(4, 12))] for _ in range(6)]
        refs = [[[rng.choice(words) for _ in range(rng.randint(4, 12))] for _ in range(rng.randint(1, 3))]
                for _ in range(6)]
        for c, r in zip(cands, refs):  # enough overlap that every n-gram order matches somewhere
            r[0] = c[:]
            r[0][0] = "x"
        assert bleu4(cands, refs) == pytest.approx(nltk_bleu.corpus_bleu(refs, cands), rel=1e-12)


def test_cider_d_equals_hand_worked_example():
    # two images, one reference each. idf: log(2) - log(df); "a" is in both references -> idf 0.
    # image B, candidate == reference "a dog": n=1 sim 1, n=2 sim 1, n=3,4 empty (0) -> 10 * 2/4 = 5.
    # image A, candidate "a cat cat" vs "a cat": n=1 vectors cand {cat: 2 l}, ref {cat: l} (l = log 2):
    # clipped dot min(2l, l) * l / (2l * l) = 1/2; n=2 cand {a cat: l, cat cat: l}, ref {a cat: l}: l^2 / (l sqrt2 l)
    # = 1/sqrt2; n=3: the reference has no 3-gram -> 0; length penalty exp(-1 / 72).
    a = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    got = cider_d([["a", "cat", "cat"], ["a", "dog"]], [[["a", "cat"]], [["a", "dog"]]])
    assert got == pytest.approx((a + 5.0) / 2, abs=1e-12)
    assert cider_d([["a", "dog"]], [[["a", "dog"]]]) == 0.0  # one image: every idf is log(1) - log(1) = 0


def test_cider_d_properties():
    refs = [[["a", "red", "bag", "at", "the", "top"], ["a", "bag", "at", "the", "top"]],
            [["two", "shoes", "at", "the", "bottom"]], [["a", "blue", "shirt", "in", "the", "middle"]]]
    perfect = cider_d([r[0] for r in refs], refs)
    wrong = cider_d([refs[1][0], refs[2][0], refs[0][0]], refs)
    assert perfect > 3 * wrong and wrong >= 0
    longer = cider_d([r[0] + ["and", "more", "words", "here"] for r in refs], refs)
    assert longer < perfect  # the length penalty and clipping (the "-D") bite


def test_caption_words_drop_case_and_punctuation():
    assert caption_words("Two items: a Bag, a shoe.") == ["two", "items", "a", "bag", "a", "shoe"]
