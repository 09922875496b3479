"""One command for a GPU: is the training step sync-free, and what do gather vs dense and eager vs compiled give?

    python bench/gpu_smoke.py                      # CUDA: 224 px, batch 64, bf16 autocast, every case
    python bench/gpu_smoke.py --batch 256 --cases fcmae_gather,fcmae_dense
    python bench/gpu_smoke.py --dry-run            # CPU (automatic without CUDA): tiny sizes, the same code path

For each case (FCMAE gather / dense on convnextv2_atto, MAE on vit_tiny, ConvMAE gather / dense on convmae_small,
fine-tuning convnextv2_atto) it runs whole training steps as the engine does: batch copied from pinned memory
without blocking, masks drawn on the device from the samples' indices (``indexed_masks``), forward + loss under
autocast, backward, gradient clipping, AdamW, the loss recorded in a device-side ``LossWatch``. Then:

1. **sync-free**: three steps under ``torch.cuda.set_sync_debug_mode("error")``: any device->host sync in the step
   (an ``.item()``, a ``nonzero``, a blocking copy) raises and is reported with its message (CUDA only). Expected:
   ``ok`` for every step, eager and compiled: the masks are passed as the engine passes them (``drawn=True``: made
   by ``indexed_masks`` at the objective's ratio, so their values are not read back to be validated);
2. **images/s** eager and ``torch.compile(fullgraph=True)`` (compile time apart), peak memory per step;
3. ratios: compiled over eager, gather over dense (both forms).

The dry run checks the code path only (compile with the ``aot_eager`` backend, which needs no C++/Triton
toolchain); its numbers say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from maskconv.engine.step import LossWatch
from maskconv.models import create_model
from maskconv.pretrain import create_objective
from maskconv.pretrain.masking import indexed_masks

CASES = {  # official mask ratios and decoders (FCMAE 512-d x1; MAE / ConvMAE 512-d x8)
    "fcmae_gather": lambda: create_objective("fcmae", model="convnextv2_atto", sparse="gather"),
    "fcmae_dense": lambda: create_objective("fcmae", model="convnextv2_atto", sparse="dense"),
    "mae": lambda: create_objective("mae", model="vit_tiny_patch16_224"),
    "convmae_gather": lambda: create_objective("convmae", model="convmae_small", sparse="gather"),
    "convmae_dense": lambda: create_objective("convmae", model="convmae_small", sparse="dense"),
    "finetune": lambda: create_model("convnextv2_atto", num_classes=1000),
}


class Trainer:
    """One case's training step, as ``engine/loop.py`` runs it (minus the data loader and the logging)."""

    def __init__(self, name: str, device: torch.device, size: int, batch: int, amp: bool):
        torch.manual_seed(0)
        self.name, self.device, self.batch = name, device, batch
        self.m = CASES[name]().to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.m.parameters() if p.requires_grad], lr=1e-4)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        pin = device.type == "cuda"
        self.x = torch.randn(batch, 3, size, size).pin_memory() if pin else torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 1000, (batch,))
        self.idx = torch.arange(batch)
        if pin:
            self.y, self.idx = self.y.pin_memory(), self.idx.pin_memory()
        self.watch = LossWatch(device)
        self.fn = self.loss
        self.micro = 0

    def loss(self, x, target):
        if self.name == "finetune":
            return F.cross_entropy(self.m(x), target, label_smoothing=0.1)
        return self.m(x, mask=target, drawn=True).loss  # as the engine's pretrain loss (no read-back)

    def compile(self, backend: str | None) -> None:
        torch._dynamo.reset()
        self.fn = torch.compile(self.loss, fullgraph=True, **({"backend": backend} if backend else {}))

    def step(self) -> None:
        x = self.x.to(self.device, non_blocking=True)
        if self.name == "finetune":
            target = self.y.to(self.device, non_blocking=True)
        else:
            h, w = self.m.grid(x)
            target = indexed_masks(self.idx.to(self.device, non_blocking=True), 0, 0, h, w, self.m.mask_ratio)
        with self.amp:
            loss = self.fn(x, target)
        self.watch.update(loss, self.micro)
        self.micro += 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.m.parameters(), 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sync_free(t: Trainer) -> str:
    """'ok', or the message of the first device->host sync in a step."""
    if t.device.type != "cuda":
        return "n/a (CPU)"
    _sync(t.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.step()
        return "ok"
    except RuntimeError as e:
        return "SYNC: " + str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def images_per_s(t: Trainer, steps: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        _sync(t.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            t.step()
        _sync(t.device)  # the only wait: after the timed steps
        rates.append(steps * t.batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_case(name: str, device, a) -> dict:
    t = Trainer(name, device, a.size, a.batch, a.amp)
    row = dict(case=name)
    t.step()  # eager warm-up (AdamW state, cuDNN plans)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["eager"] = images_per_s(t, a.steps, a.rounds)
    row["eager_sync"] = sync_free(t)
    row["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t.compile("aot_eager" if a.dry_run else None)
    t0 = time.perf_counter()
    t.step()
    _sync(device)
    row["compile_s"] = time.perf_counter() - t0
    t.step()
    row["compiled"] = images_per_s(t, a.steps, a.rounds)
    row["compiled_sync"] = sync_free(t)
    bad = t.watch.first_non_finite(_info(device))
    row["finite"] = bad is None
    return row


def _info(device):
    from maskconv.engine.dist import DistInfo

    return DistInfo(device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the code path (automatic "
                    "without CUDA)")
    ap.add_argument("--size", type=int, default=None, help="image size (default 224; dry run 64)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 64; dry run 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10; dry run 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16 autocast")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        print("no CUDA device: dry run on the CPU (tiny sizes; the numbers say nothing about a GPU)")
        a.dry_run = True
    d = (64, 2, 1, 1) if a.dry_run else (224, 64, 10, a.rounds)
    a.size, a.batch, a.steps = a.size or d[0], a.batch or d[1], a.steps or d[2]
    a.rounds = d[3] if a.dry_run else a.rounds
    a.amp = a.amp and cuda
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}, {a.size} px, batch {a.batch}, {'bf16' if a.amp else 'fp32'}, "
          f"{a.rounds} x {a.steps} steps (median images/s)", flush=True)
    print("| case | eager img/s | compiled img/s | compiled / eager | compile s | peak GiB (eager) | "
          "sync-free eager | sync-free compiled |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    rows = {}
    for c in a.cases.split(","):
        r = rows[c] = run_case(c, device, a)
        print(f"| {c} | {r['eager']:.1f} | {r['compiled']:.1f} | {r['compiled'] / r['eager']:.2f}x | "
              f"{r['compile_s']:.1f} | {r['mem_gib']:.2f} | {r['eager_sync']} | {r['compiled_sync']} |", flush=True)
        if not r["finite"]:
            print(f"  warning: {c}: a non-finite loss during the run")
    for obj in ("fcmae", "convmae"):
        g, dd = rows.get(f"{obj}_gather"), rows.get(f"{obj}_dense")
        if g and dd:
            print(f"{obj}: gather over dense: eager {g['eager'] / dd['eager']:.2f}x, "
                  f"compiled {g['compiled'] / dd['compiled']:.2f}x")


if __name__ == "__main__":
    main()
