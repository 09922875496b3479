"""Eager vs ``torch.compile(fullgraph=True)`` training step, every objective + fine-tuning, in one run.

A step = forward (masked encoder + decoder + loss, or classifier + cross-entropy) + backward; the optimizer is
left out (the same eager AdamW either way). Same weights and masks for both forms of a case; the compiled one
is checked against eager (loss within float tolerance) before it is timed. Compile time (the first call:
dynamo + AOT autograd + inductor, forward and backward) is reported apart from the step time. Rounds interleave
eager and compiled; medians. Also prints FCMAE / ConvMAE gather-over-dense ratios in both forms (does the
gathered path's speed-up survive compilation?).

    OMP_NUM_THREADS=1 python bench/compile_step.py [--size 64 --batch 8 --rounds 5 --reps 2] [--cases fcmae_gather,...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from maskconv.models import create_model
from maskconv.pretrain import create_objective
from maskconv.pretrain.masking import indexed_masks

CASES = {  # name -> builder (official mask ratios; small decoders so the encoder dominates as at scale)
    "fcmae_gather": lambda: create_objective("fcmae", model="convnextv2_atto", sparse="gather", decoder_dim=256),
    "fcmae_dense": lambda: create_objective("fcmae", model="convnextv2_atto", sparse="dense", decoder_dim=256),
    "mae": lambda: create_objective("mae", model="vit_tiny_patch16_224", decoder_dim=128, decoder_depth=2,
                                    decoder_heads=4),
    "convmae_gather": lambda: create_objective("convmae", model="convmae_small", sparse="gather", decoder_dim=128,
                                               decoder_depth=2, decoder_heads=4),
    "convmae_dense": lambda: create_objective("convmae", model="convmae_small", sparse="dense", decoder_dim=128,
                                              decoder_depth=2, decoder_heads=4),
    "finetune": lambda: create_model("convnextv2_atto", num_classes=10),
}


def make_step(name: str, size: int, batch: int):
    """(module, step(), loss fn, args) with fixed inputs; step() runs forward + backward of ``fn(*args)``."""
    torch.manual_seed(0)
    m = CASES[name]().train()
    x = torch.randn(batch, 3, size, size)
    if name == "finetune":
        args = (x, torch.randint(0, 10, (batch,)))

        def fn(x, y):
            return F.cross_entropy(m(x), y, label_smoothing=0.1)
    else:
        h, w = m.grid(x)
        args = (x, indexed_masks(torch.arange(batch), 0, 0, h, w, m.mask_ratio))

        def fn(x, mask):
            return m(x, mask=mask).loss
    return m, fn, args


def _run(m, fn, args) -> torch.Tensor:
    m.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach()


def run_case(name: str, size: int, batch: int, rounds: int, reps: int, mode: str | None) -> dict:
    m, fn, args = make_step(name, size, batch)
    ref = _run(m, fn, args)  # eager warm-up
    torch._dynamo.reset()
    cfn = torch.compile(fn, fullgraph=True, mode=mode)
    t0 = time.perf_counter()
    got = _run(m, cfn, args)
    compile_s = time.perf_counter() - t0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # compiled == eager before any timing
    _run(m, cfn, args)
    times = {"eager": [], "compiled": []}
    for r in range(rounds):
        for form in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            f = fn if form == "eager" else cfn
            t0 = time.perf_counter()
            for _ in range(reps):
                _run(m, f, args)
            times[form].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(case=name, eager_ms=med["eager"] * 1e3, compiled_ms=med["compiled"] * 1e3,
                speedup=med["eager"] / med["compiled"], compile_s=compile_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.size} px, batch {a.batch}, "
          f"{a.rounds} rounds x {a.reps} steps (medians); step = forward + backward", flush=True)
    rows = {}
    print("| step | eager ms | compiled ms | compiled speed-up | compile s (first call) |")
    print("|---|---:|---:|---:|---:|")
    for name in a.cases.split(","):
        r = rows[name] = run_case(name, a.size, a.batch, a.rounds, a.reps, a.mode)
        print(f"| {name} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | **{r['speedup']:.2f}x** | "
              f"{r['compile_s']:.1f} |", flush=True)
    for obj in ("fcmae", "convmae"):
        g, d = rows.get(f"{obj}_gather"), rows.get(f"{obj}_dense")
        if g and d:
            print(f"{obj}: gather speed-up over dense: eager {d['eager_ms'] / g['eager_ms']:.2f}x, "
                  f"compiled {d['compiled_ms'] / g['compiled_ms']:.2f}x")


if __name__ == "__main__":
    main()
