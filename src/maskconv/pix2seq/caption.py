"""Pix2Seq v2 captioning (task 13): the caption's words as text tokens after the prompt, then an end token.

Sources (google-research/pix2seq): ``tasks/captioning.py`` (``preprocess_batched``: end-token weight, input token
dropout to the fake text token), ``vocab.py`` (text tokens = id + text shift). The official model uses a 32k
SentencePiece model trained on C4; here the vocabulary is the words of the training captions
(``WordVocab.build``), a few hundred tokens instead of 32k, which a small model on a small data set can learn.
Ids follow SentencePiece's layout where it matters: id 1 is the end token (the official end is spm id 1 + shift).
Words are split on spaces, with closing punctuation (``.,:;!?``) split off, so ``decode(encode(s)) == s`` for any
single-spaced caption whose words are in the vocabulary.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .vocab import FAKE_TEXT_TOKEN, PADDING_TOKEN, TASK_TOKENS, Vocab

__all__ = ["WordVocab", "CaptionTokenizer", "split_words", "join_words"]

UNK, EOS = 0, 1
_PUNCT = ".,:;!?"


def split_words(text: str) -> list[str]:
    """'two items: a bag.' -> ['two', 'items', ':', 'a', 'bag', '.']"""
    out = []
    for chunk in text.split():
        m = re.match(rf"^(.*?)([{re.escape(_PUNCT)}]*)$", chunk)
        word, tail = m.group(1), m.group(2)
        if word:
            out.append(word)
        out += list(tail)
    return out


def join_words(words: list[str]) -> str:
    """The inverse of ``split_words`` on single-spaced text: punctuation sticks to the word before it."""
    text = ""
    for w in words:
        text += w if (w in _PUNCT and len(w) == 1 and text) else (" " + w if text else w)
    return text


@dataclass
class WordVocab:
    """Word list: id 0 unknown, id 1 end, then the words (most frequent first, ties alphabetical)."""
    words: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, captions, min_count: int = 1) -> WordVocab:
        counts = Counter(w for c in captions for w in split_words(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(["<unk>", "<eos>"] + kept)

    def __post_init__(self):
        self._index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(w, UNK) for w in split_words(text)]

    def decode(self, ids: list[int]) -> str:
        return join_words([self.words[i] for i in ids if 0 <= i < len(self.words) and i != EOS])


@dataclass
class CaptionTokenizer:
    """Caption -> (input, target), each (seq_len,); generated tokens -> text. ``vocab.text_size`` must hold the
    words. Defaults as the official captioning config: end weight 0.1, input drop rate 0.5."""
    vocab: Vocab
    words: WordVocab
    max_len: int = 64  # response tokens, end included (official max_seq_len 128 for SentencePiece pieces)
    eos_token_weight: float = 0.1
    input_drop: float = 0.5
    task: str = "captioning"

    def __post_init__(self):
        if self.vocab.text_size < len(self.words):
            raise ValueError(f"the vocabulary holds {self.vocab.text_size} text tokens; the captions use "
                             f"{len(self.words)} words")

    @property
    def seq_len(self) -> int:
        return self.max_len

    @property
    def eos(self) -> int:
        return self.vocab.text_shift + EOS

    def response(self, text: str) -> torch.Tensor:
        """Text tokens then the end token, cut to ``max_len`` (the end kept), padded with padding."""
        ids = self.words.encode(text)[:self.max_len - 1] + [EOS]
        r = torch.tensor(ids, dtype=torch.long) + self.vocab.text_shift
        return torch.nn.functional.pad(r, (0, self.max_len - len(r)), value=PADDING_TOKEN)

    def encode(self, text: str, train: bool = True):
        """Official ``preprocess_batched``: ``[prompt, response]`` shifted into (input, target); in training every
        input token (the prompt too, as official) becomes the fake text token with probability ``input_drop``."""
        seq = torch.cat([torch.tensor([TASK_TOKENS[self.task]]), self.response(text)])
        inp, tgt = seq[:-1], seq[1:]
        if train and self.input_drop > 0:
            inp = torch.where(torch.rand(inp.shape) > self.input_drop, inp, torch.full_like(inp, FAKE_TEXT_TOKEN))
        return inp, tgt

    def encode_missing(self):
        """(input, target) of an image without a caption: the prompt then padding, and a target with no end token,
        which ``weights`` gives weight 0 (the image teaches no caption, not the empty one)."""
        seq = torch.full((self.max_len + 1,), PADDING_TOKEN, dtype=torch.long)
        seq[0] = TASK_TOKENS[self.task]
        return seq[:-1], seq[1:]

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        """Official: the end token ``eos_token_weight``, every other target (padding too) 1; a row without an end
        token (``encode_missing``: no caption) weighs 0."""
        ones = torch.ones(target.shape, device=target.device)  # on the target's device: no host round trip
        w = torch.where(target == self.eos, ones * self.eos_token_weight, ones)
        return w * (target == self.eos).any(-1, keepdim=True)

    def decode(self, response: torch.Tensor) -> list[str]:
        """(B, L) generated tokens -> captions: text tokens up to the first end or padding token."""
        out = []
        for row in response.tolist():
            ids = []
            for t in row:
                if t in (self.eos, PADDING_TOKEN):
                    break
                if t >= self.vocab.text_shift:
                    ids.append(t - self.vocab.text_shift)
            out.append(self.words.decode(ids))
        return out
