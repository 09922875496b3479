"""SLaK stage-1 large-kernel conv at its real size: decomposed (51×5 + 5×51 + 5×5) vs dense 51×51 vs merged.

The module of one SLaK-T stage-1 block (C=124, 56×56 map, M=51, N=5), interleaved in one run:
- training step (BN in train mode): forward + backward (input and weight gradients), decomposed vs a dense
  51×51 depthwise conv-BN (what a non-decomposed large-kernel model trains);
- inference (eval, no grad): decomposed vs dense conv-BN vs the merged kernel (one 51×51 conv with bias,
  ``reparameterize()``).
Each memory format is measured apart (maskconv's SLaK keeps activations channels_last). Prints median times and
ratios; absolute times depend on the machine and its load, the ratios are the result.

    .venv/bin/python bench/large_kernel.py [--batch 4] [--rounds 5] [--formats channels_last nchw]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from maskconv.layers import ConvBN, DecomposedLargeKernelConv


def _train_step(m, x, g):
    x.grad = None
    m.zero_grad(set_to_none=True)
    m(x).backward(g)


def _infer(m, x):
    with torch.no_grad():
        m(x)


def _timed(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run(fmt: str, batch: int, dim: int, size: int, kernel: int, small: int, rounds: int, reps: int) -> dict:
    torch.manual_seed(0)
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    dec = DecomposedLargeKernelConv(dim, kernel, small).to(memory_format=mf)
    dense = ConvBN(dim, dim, kernel, groups=dim).to(memory_format=mf)
    with torch.no_grad():  # non-trivial BN statistics, so the merge folds something
        for m in (dec, dense):
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 2.0)
    merged = copy.deepcopy(dec).eval()
    merged.reparameterize()
    merged = merged.to(memory_format=mf)
    x = torch.randn(batch, dim, size, size).contiguous(memory_format=mf).requires_grad_(True)
    g = torch.randn(batch, dim, size, size).contiguous(memory_format=mf)
    xi = x.detach()

    with torch.no_grad():  # the merged conv computes what the branches compute (eval mode)
        err = (merged(xi) - dec.eval()(xi)).abs().max().item()

    train = {"decomposed": lambda: _train_step(dec.train(), x, g), "dense": lambda: _train_step(dense.train(), x, g)}
    infer = {"decomposed": lambda: _infer(dec.eval(), xi), "dense": lambda: _infer(dense.eval(), xi),
             "merged": lambda: _infer(merged, xi)}
    for fn in (*train.values(), *infer.values()):  # warm-up: oneDNN primitive creation, allocator
        fn()
    tt = {k: [] for k in train}
    ti = {k: [] for k in infer}
    for r in range(rounds):  # interleaved, order alternating, so load changes hit every variant alike
        for k in (list(train) if r % 2 == 0 else list(train)[::-1]):
            tt[k].append(_timed(train[k], reps))
        for k in (list(infer) if r % 2 == 0 else list(infer)[::-1]):
            ti[k].append(_timed(infer[k], reps))
    med_t = {k: statistics.median(v) for k, v in tt.items()}
    med_i = {k: statistics.median(v) for k, v in ti.items()}
    return dict(fmt=fmt, train=med_t, infer=med_i, err=err)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=124)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--kernel", type=int, default=51)
    p.add_argument("--small", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--formats", nargs="+", default=["channels_last", "nchw"], choices=["channels_last", "nchw"])
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, C={args.dim} {args.size}x{args.size} "
          f"batch {args.batch}, M={args.kernel} N={args.small}, rounds {args.rounds} x {args.reps} (median)")
    print("| memory format | train ms: decomposed | train ms: dense | **train dense/decomposed** | "
          "infer ms: decomposed | infer ms: dense | infer ms: merged | **infer dense/decomposed** | "
          "**infer decomposed/merged** | merge max abs err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in args.formats:
        r = run(fmt, args.batch, args.dim, args.size, args.kernel, args.small, args.rounds, args.reps)
        t, i = r["train"], r["infer"]
        print(f"| {fmt} | {t['decomposed'] * 1e3:.0f} | {t['dense'] * 1e3:.0f} | **{t['dense'] / t['decomposed']:.2f}×** | "
              f"{i['decomposed'] * 1e3:.1f} | {i['dense'] * 1e3:.1f} | {i['merged'] * 1e3:.1f} | "
              f"**{i['dense'] / i['decomposed']:.2f}×** | **{i['decomposed'] / i['merged']:.2f}×** | {r['err']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
