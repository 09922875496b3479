"""Pix2Seq decoding speed: tokens/s with and without the key/value cache, interleaved in one run.

The model is the official R50-variant decoder (6 x 256, 8 heads, MLP 1024) on convnextv2_atto at 128 px,
untrained (speed does not depend on the weights); every call decodes ``--tokens`` tokens after the prompt, as
the official code does (no early stop). Rounds alternate the order; the median time of each is reported.

    .venv/bin/python bench/pix2seq_decode.py [--tokens 500 --batch 1 32 --rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskconv.pix2seq.task import Pix2SeqOptions, build_pix2seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="convnextv2_atto")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    o = Pix2SeqOptions(max_objects=-(-a.tokens // 5))
    model = build_pix2seq(a.backbone, o, a.size).eval()
    print(f"{a.backbone} @ {a.size}px, decoder {o.depth}x{o.dim}, {a.tokens} tokens, threads "
          f"{torch.get_num_threads()}")
    for b in a.batch:
        x, prompt = torch.randn(b, 3, a.size, a.size), torch.full((b, 1), 10)
        times = {True: [], False: []}
        for r in range(a.rounds):
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                t = time.perf_counter()
                model.generate(x, prompt, a.tokens, greedy=True, use_cache=cache)
                times[cache].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {b}: cached {b * a.tokens / med[True]:.0f} tok/s, uncached {b * a.tokens / med[False]:.0f} "
              f"tok/s, speed-up x{med[False] / med[True]:.2f}")


if __name__ == "__main__":
    main()
