"""Pix2Seq model: any maskconv backbone as the encoder, a pre-LN Transformer decoder writing tokens.

Follows google-research/pix2seq ``models/ar_model.py`` and ``architectures/transformers.py``:

* encoder: the backbone's last feature map (``forward_intermediates``), flattened, then the official
  ``dec_proj_mode='mlp'`` projection: Linear -> LayerNorm -> + fixed 2-D sin-cos positions -> one pre-LN
  residual MLP.
* decoder (``AutoregressiveDecoder``): learned 1-D positions, token embedding shared with the output layer
  (logits = LN(h) E^T + b), pre-LN layers of causal self-attention -> cross-attention -> MLP.
* incremental decoding keeps each layer's self-attention keys/values (the official code caches the LN-ed inputs
  and re-projects them every step; caching K/V is the faster form its comment mentions) and projects the
  encoder's keys/values once per image. Every attention is ``F.scaled_dot_product_attention``.
* sampling: ``logits / temperature``, top-k, then the official top-p (keep the tokens whose inclusive cumulative
  probability is <= p, and always the top one).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from ..layers.norm import LayerNorm
from ..layers.pos_embed import sincos_pos_embed_2d
from ..layers.transformer import Mlp

__all__ = ["Pix2Seq", "TransformerDecoder", "top_p_top_k"]


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:  # (B, N, C) -> (B, h, N, C/h)
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # (B, h, N, d) -> (B, N, h*d)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class DecoderLayer(nn.Module):
    """x += SelfAttn(LN x) (causal); x += CrossAttn(LN x, memory); x += MLP(LN x); drop path on each branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.1, drop_path: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder dim {dim} must be divisible by its {heads} heads")
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.q_cross = nn.Linear(dim, dim)
        self.kv_cross = nn.Linear(dim, 2 * dim)
        self.proj_cross = nn.Linear(dim, dim)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop = nn.Dropout(drop)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_cross(memory).chunk(2, -1)
        return _heads(k, self.heads), _heads(v, self.heads)  # (B, h, S, d) each

    def forward(self, x: torch.Tensor, mem_kv: tuple[torch.Tensor, torch.Tensor],
                cache: dict | None = None) -> torch.Tensor:  # (B, T, C)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        if cache is not None and "k" in cache:  # incremental: this step's token(s) after the cached ones
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            if q.shape[2] != 1:
                raise ValueError("with a filled cache, decode one token at a time")
            causal = False  # one new query sees every earlier key
        else:
            causal = True
        if cache is not None:
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.drop_path(self.drop(self.proj(_merge(a))))
        q = _heads(self.q_cross(self.norm2(x)), self.heads)
        a = F.scaled_dot_product_attention(q, *mem_kv)
        x = x + self.drop_path(self.drop(self.proj_cross(_merge(a))))
        return x + self.drop_path(self.mlp(self.norm3(x)))


class TransformerDecoder(nn.Module):
    """Token + learned position embedding -> layers -> LN -> tied output projection (+ bias)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 256, depth: int = 6, heads: int = 8,
                 mlp_ratio: float = 4.0, drop: float = 0.1, drop_path: float = 0.1):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, mlp_ratio, drop, drop_path) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, mem_kv: list, caches: list[dict] | None = None,
                start: int = 0, last: bool = False) -> torch.Tensor:
        """``tokens`` (B, T) at positions start..start+T-1 -> logits (B, T, V); ``last``: only the last
        position's (B, 1, V) - what sampling reads (an uncached decode would otherwise project all T positions at
        every step and throw T - 1 of them away)."""
        T = tokens.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the decoder's {self.max_len} positions")
        x = self.token_embed(tokens) + self.pos_embed[:, start:start + T]
        for i, layer in enumerate(self.layers):
            x = layer(x, mem_kv[i], caches[i] if caches is not None else None)
        if last:
            x = x[:, -1:]
        return F.linear(self.norm(x), self.token_embed.weight, self.out_bias)


def top_p_top_k(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Official ``top_logits``: keep the k best, and the tokens whose inclusive cumulative probability is <= p,
    always the best one; the others get -inf. ``logits`` (B, V)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 0] = False  # the top token is always kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Pix2Seq(nn.Module):
    """``encoder`` (a maskconv backbone) + projection + ``TransformerDecoder``. ``forward(images, input_seq)``
    gives teacher-forced logits (B, L, V); ``generate`` writes sequences."""

    def __init__(self, encoder: nn.Module, vocab_size: int, max_len: int, dim: int = 256, depth: int = 6,
                 heads: int = 8, mlp_ratio: float = 4.0, drop: float = 0.1, drop_path: float = 0.1):
        super().__init__()
        self.encoder = encoder
        chans = encoder.feature_info[-1]["num_chs"]
        self.proj = nn.Linear(chans, dim)
        self.proj_norm = LayerNorm(dim)
        self.proj_mlp_norm = LayerNorm(dim)
        self.proj_mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.decoder = TransformerDecoder(vocab_size, max_len, dim, depth, heads, mlp_ratio, drop, drop_path)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> memory (B, h*w, dim)."""
        fmap = self.encoder.forward_intermediates(images, indices=1, intermediates_only=True)[-1]  # (B, C, h, w)
        b, c, h, w = fmap.shape
        x = self.proj_norm(self.proj(fmap.flatten(2).transpose(1, 2)))  # (B, h*w, dim)
        x = x + sincos_pos_embed_2d(x.shape[-1], (h, w), dtype=x.dtype, device=x.device)[None]
        return x + self.proj_mlp(self.proj_mlp_norm(x))

    def memory_kv(self, memory: torch.Tensor) -> list:
        return [layer.memory_kv(memory) for layer in self.decoder.layers]

    def forward(self, images: torch.Tensor, input_seq, tiles: list[int] | None = None):
        """Teacher-forced logits (B, L, V) of ``input_seq`` (B, L). Several tasks at once (Pix2Seq v2): a list of
        sequences, the i-th (B * tiles[i], L_i) - each image's encoding repeated ``tiles[i]`` times, once per
        object of an instance task - gives a list of logits; the encoder runs once."""
        mem_kv = self.memory_kv(self.encode(images))
        if isinstance(input_seq, torch.Tensor):
            return self.decoder(input_seq, mem_kv)
        tiles = tiles or [1] * len(input_seq)
        return [self.decoder(seq, mem_kv if n == 1 else [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0))
                                                          for k, v in mem_kv]) for seq, n in zip(input_seq, tiles)]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt: torch.Tensor, max_len: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, use_cache: bool = True,
                 generator: torch.Generator | None = None,
                 memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``max_len`` tokens after ``prompt`` (B, P), batched; no early stop (as official).
        ``memory`` (B, S, dim): an encoded batch to reuse (the official ``encoded=``; v2's instance tasks tile
        one image's encoding over its objects and samples) - then ``images`` is not read.
        Returns (tokens (B, max_len), logits (B, max_len, V)) - the logits before temperature and filtering."""
        mem_kv = self.memory_kv(self.encode(images) if memory is None else memory)
        seq = prompt
        caches = [{} for _ in self.decoder.layers] if use_cache else None
        out_tokens, out_logits = [], []
        step_in, start = prompt, 0
        for _ in range(max_len):
            if use_cache:
                logits = self.decoder(step_in, mem_kv, caches, start, last=True)[:, -1]
                start += step_in.shape[1]
            else:
                logits = self.decoder(seq, mem_kv, last=True)[:, -1]
            if greedy:
                nxt = logits.argmax(-1)
            else:
                filtered = top_p_top_k(logits.float() / temperature, top_k, top_p)
                nxt = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
            out_tokens.append(nxt)
            out_logits.append(logits)
            seq = torch.cat([seq, nxt[:, None]], 1)
            step_in = nxt[:, None]
        return torch.stack(out_tokens, 1), torch.stack(out_logits, 1)
