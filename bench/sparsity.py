"""Cost of dynamic sparse training (engine/sparsity.py) relative to a dense training step, measured in one run.

Per round, interleaved: a dense step (forward + cross-entropy + backward + AdamW) and a sparse step (the same
+ ``DynamicSparsity.step``: masking weights and AdamW state), the masking alone, and one prune/regrow
``update``. Prints medians and their ratios to the dense step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sparsity.py --model convnextv2_atto --img 64 --batch 32 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import maskconv
from maskconv.engine.sparsity import DynamicSparsity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="convnextv2_atto")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="train steps per round and variant")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = maskconv.create_model(a.model, num_classes=10)
    sparse = maskconv.create_model(a.model, num_classes=10)
    sparse.load_state_dict(dense.state_dict())
    sp = DynamicSparsity(sparse, a.sparsity, init="erk", update_every=0, total_steps=1000)
    sp.init_masks()
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-4, weight_decay=0.05)
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, 10, (a.batch,))

    def train(model, opt, after=None):
        t = time.perf_counter()
        for s in range(a.steps):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after is not None:
                after(opt, s + 1)
        return (time.perf_counter() - t) / a.steps

    train(dense, opt_d)  # warm-up (allocations, oneDNN primitives, AdamW state)
    train(sparse, opt_s, sp.step)
    td, ts, tu, ta = [], [], [], []
    for _ in range(a.rounds):
        td.append(train(dense, opt_d))
        ts.append(train(sparse, opt_s, sp.step))
        t = time.perf_counter()
        sp.apply(opt_s)  # the per-step masking alone
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        sp.update(0.3, opt_s)
        tu.append(time.perf_counter() - t)
    md, ms, mu, ma = (statistics.median(v) * 1e3 for v in (td, ts, tu, ta))
    n = sum(sp.sizes.values())
    print(f"{a.model} @{a.img} b{a.batch}, sparsity {a.sparsity} (erk) over {len(sp.names)} weights "
          f"({n / 1e6:.2f}M of {sum(p.numel() for p in sparse.parameters()) / 1e6:.2f}M params), "
          f"{torch.get_num_threads()} threads, median of {a.rounds} rounds x {a.steps} steps")
    print(f"dense step {md:.1f} ms | sparse step {ms:.1f} ms | ratio sparse/dense {ms / md:.3f}x | "
          f"masking alone {ma:.1f} ms = {ma / md:.3f} dense steps | prune/regrow update {mu:.1f} ms = "
          f"{mu / md:.2f} dense steps")


if __name__ == "__main__":
    main()
