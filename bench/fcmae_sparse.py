"""FCMAE training step, gathered sparse encoder vs dense-masked reference, interleaved in one run.

A step = forward (encoder + decoder + loss) + backward + AdamW as the engine builds it (fused, decay groups).
Same weights, same masks for both paths.
Prints median step times, the ratio dense/gather (> 1: gather faster) and the peak memory allocated during a
step (PyTorch CPU allocator, from the profiler's allocation trace), ratio gather/dense.

    .venv/bin/python bench/fcmae_sparse.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskconv.engine.optim import build_optimizer
from maskconv.pretrain import create_objective

DEFAULT_CASES = ["convnextv2_atto:224:16:0.6", "convnextv2_atto:64:64:0.6",
                 "convnextv2_atto:224:16:0.4", "convnextv2_atto:224:16:0.75"]


def _step(obj, opt, x, mask):
    opt.zero_grad(set_to_none=True)
    obj(x, mask).loss.backward()
    opt.step()


def peak_step_memory(obj, opt, x, mask) -> float:
    """Peak bytes held by allocations made during one step (running sum of allocs/frees, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(obj, opt, x, mask)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def run_case(name: str, size: int, batch: int, ratio: float, rounds: int, reps: int) -> dict:
    torch.manual_seed(0)
    objs = {p: create_objective("fcmae", model=name, mask_ratio=ratio, sparse=p) for p in ("gather", "dense")}
    objs["dense"].load_state_dict(objs["gather"].state_dict())
    opts = {p: build_optimizer(o, 1e-4, 0.05, (0.9, 0.95)) for p, o in objs.items()}  # the engine's AdamW
    x = torch.randn(batch, 3, size, size)
    mask = objs["gather"].make_mask(x)
    for p in objs:  # warm-up (and AdamW state allocation) before timing / memory tracing
        _step(objs[p], opts[p], x, mask)
    mem = {p: peak_step_memory(objs[p], opts[p], x, mask) for p in objs}
    times = {p: [] for p in objs}
    for r in range(rounds):
        for p in (("gather", "dense") if r % 2 == 0 else ("dense", "gather")):
            t0 = time.perf_counter()
            for _ in range(reps):
                _step(objs[p], opts[p], x, mask)
            times[p].append((time.perf_counter() - t0) / reps)
    med = {p: statistics.median(v) for p, v in times.items()}
    return dict(case=f"{name} @{size} b{batch} mask {ratio}", gather_ms=med["gather"] * 1e3,
                dense_ms=med["dense"] * 1e3, speedup=med["dense"] / med["gather"],
                gather_mb=mem["gather"] / 2**20, dense_mb=mem["dense"] / 2**20, mem_ratio=mem["gather"] / mem["dense"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="model:size:batch:mask_ratio")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {args.rounds} x {args.reps} (median)")
    print("| case | dense ms | gather ms | speed-up (dense/gather) | dense peak MB | gather peak MB | memory gather/dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        name, size, batch, ratio = case.split(":")
        r = run_case(name, int(size), int(batch), float(ratio), args.rounds, args.reps)
        print(f"| {r['case']} | {r['dense_ms']:.0f} | {r['gather_ms']:.0f} | **{r['speedup']:.2f}×** | "
              f"{r['dense_mb']:.0f} | {r['gather_mb']:.0f} | **{r['mem_ratio']:.2f}×** |", flush=True)


if __name__ == "__main__":
    main()
