"""maskconv vs timm, same ConvNeXt, same weights, batch, resolution and threads, interleaved in one run.

Prints, per case, the median time of a training step (forward + cross-entropy + backward + AdamW step) and of
inference, for both libraries, and the ratio timm_time / maskconv_time (> 1: maskconv is faster).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/convnext_vs_timm.py [--rounds 7] [--cases convnextv2_atto:224:16 ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import maskconv  # noqa: E402

DEFAULT_CASES = ["convnextv2_atto:224:16", "convnextv2_atto:64:64", "convnextv2_tiny:224:8", "convnextv2_tiny:64:32"]


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (all threads)


def _time(fn, reps: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps


def run_case(name: str, size: int, batch: int, rounds: int, reps: int, clock=time.perf_counter) -> dict:
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=100)
    ours = maskconv.create_model(name, num_classes=100)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    models = {"timm": ref, "maskconv": ours}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {f"{k}_{what}": [] for k in models for what in ("train", "infer")}
    for k, m in models.items():  # warm-up: allocator, oneDNN primitive caches
        m.train()
        _train_step(m, opts[k], x, y)
        m.eval()
        with torch.inference_mode():
            m(x)
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for k in order:
            m = models[k]
            m.train()
            times[f"{k}_train"].append(_time(lambda: _train_step(m, opts[k], x, y), reps, clock))
            m.eval()
            with torch.inference_mode():
                times[f"{k}_infer"].append(_time(lambda: m(x), reps, clock))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        case=f"{name} @{size} b{batch}",
        train_ratio=med["timm_train"] / med["maskconv_train"],
        infer_ratio=med["timm_infer"] / med["maskconv_infer"],
        **{k: v * 1e3 for k, v in med.items()},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="model:size:batch")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=2, help="steps per timing sample")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: process CPU time, less disturbed by other jobs on a shared machine (use with --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, maskconv {maskconv.__version__}, "
          f"threads {torch.get_num_threads()}, {args.clock} clock, rounds {args.rounds} x {args.reps} steps (median)")
    print("| case | train ms timm | train ms maskconv | train ratio | infer ms timm | infer ms maskconv | infer ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        name, size, batch = case.split(":")
        r = run_case(name, int(size), int(batch), args.rounds, args.reps, CLOCKS[args.clock])
        print(f"| {r['case']} | {r['timm_train']:.1f} | {r['maskconv_train']:.1f} | **{r['train_ratio']:.2f}×** "
              f"| {r['timm_infer']:.1f} | {r['maskconv_infer']:.1f} | **{r['infer_ratio']:.2f}×** |", flush=True)


if __name__ == "__main__":
    main()
