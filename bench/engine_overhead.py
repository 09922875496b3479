"""The engine's own overhead: ``maskconv pretrain`` (``tasks.pretrain.run_pretrain``, the function the CLI calls)
against a bare loop over the same objective.

Both build the same FCMAE objective (by default a ``convnextv2_atto`` encoder, 64 px, batch 8, seed 0) and its AdamW
(``engine.optim.build_optimizer``, the engine's parameter groups) and run the same steps. The bare loop trains on
the engine's batches and masks made beforehand and held in memory; per step it only runs forward, backward,
``optimizer.step()`` and ``zero_grad``: no lr schedule, no loss reading, no logging, no checkpoint, no run folder.
The engine run is the whole call as a user makes it, on ``data.path=synthetic`` (64 images: an epoch is 8 steps),
``data.num_workers=0`` (its data path -- synthetic images, RandomResizedCrop + flip + normalize, collation,
masks -- runs in the timed process), a metrics row every 10 steps, one training checkpoint (at the end: at 8
steps an epoch, the default checkpoint per epoch would be a toy's share) and the final weight files.

A third run, ``bare + data``, is the bare loop making its batches as it goes through the engine's own data path
(``train_loader`` in this process, ``indexed_masks``): engine / (bare + data) is the loop's bookkeeping alone (lr
schedule, loss watch, logging, signal and checkpoint checks).

A global optimizer-step hook stamps the end of every step, so each run gives its step-to-step intervals (all a
loop does per step) apart from its fixed cost (setup, run folder, final checkpoint and weights: the whole call
less its steps). Times are this process's CPU time (``time.process_time``; one thread, everything in this
process), not wall time: on a machine shared with other jobs wall time measures their load; CPU time leaves out
only waiting (the checkpoint's fsync). Rounds alternate the order; medians over rounds of each run's median
interval. Printed: per step, engine / bare (target <= 1.05) and engine / (bare + data); the mean intervals (epoch
ends included); the fixed cost in bare steps; the whole-call ratio.

    OMP_NUM_THREADS=1 python bench/engine_overhead.py [--rounds 10 --epochs 5] [--model convnextv2_atto
        --decoder-dim 512] [--profile]

``--model test_convnextv2 --decoder-dim 16``: a ~20 ms step, so the loop's own per-step cost shows in
milliseconds (to set against the atto step).

``--profile``: one engine run under cProfile instead, the top entries by cumulative time.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from maskconv.config import load_config
from maskconv.data.build import build_dataset, build_transform
from maskconv.engine.loop import train_loader
from maskconv.engine.optim import build_optimizer
from maskconv.engine import dist as D
from maskconv.pretrain import create_objective
from maskconv.pretrain.masking import indexed_masks
from maskconv.rebuild import model_kwargs
from maskconv.tasks.pretrain import run_pretrain


def config(out: str, epochs: int, model: str = "convnextv2_atto", decoder_dim: int = 512):
    """The engine run's config: one training checkpoint, at the end."""
    return load_config(overrides={
        "task": "pretrain", "model.name": model, "objective.name": "fcmae", "objective.decoder_dim": decoder_dim,
        "data.path": "synthetic",
        "data.img_size": 64, "data.batch_size": 8, "data.num_workers": 0, "optim.epochs": epochs,
        "optim.lr": 1e-3, "run.device": "cpu", "run.progress": False, "run.seed": 0, "run.out": out,
        "run.save_every_epochs": epochs})


def objective(cfg):
    """The objective as ``run_pretrain`` builds it (seeded the same way)."""
    torch.manual_seed(cfg.run.seed)
    return create_objective(cfg.objective.name, model=cfg.model.name, model_kwargs=model_kwargs(cfg),
                            decoder_dim=cfg.objective.decoder_dim, norm_pix_loss=cfg.objective.norm_pix_loss)


def engine_batches(cfg, obj):
    """Every step's (images (B, 3, H, W), masks (B, h, w)) as the engine makes them, in its order: its
    ``train_loader`` in this process and ``indexed_masks`` (``obj``: the objective, for its mask grid and ratio)."""
    ds = build_dataset(cfg.data, cfg.model.in_chans, "train", labeled=False)
    tf = build_transform(cfg.data, cfg.model.in_chans, train=True, weak=True)
    loader = train_loader(ds, tf, cfg.run.seed, cfg.data.batch_size, D.DistInfo(), len(ds) // cfg.data.batch_size,
                          num_workers=0)
    for epoch in range(cfg.optim.epochs):
        loader.sampler.epoch = epoch
        for images, _, _, indices in loader:
            h, w = obj.grid(images)
            yield images, indexed_masks(indices, epoch, cfg.run.seed, h, w, obj.mask_ratio)


@contextlib.contextmanager
def step_stamps():
    """CPU-time stamps at the end of every optimizer step taken inside the block (any optimizer)."""
    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(lambda *_: stamps.append(time.process_time()))
    try:
        yield stamps
    finally:
        handle.remove()


def bare(cfg, batches: list | None) -> tuple[float, list[float]]:
    """(whole-call CPU seconds, step-end stamps). ``batches`` None: made as the loop goes (the engine's data path)."""
    with step_stamps() as stamps:
        t0 = time.process_time()
        obj = objective(cfg).train()
        o = cfg.optim
        opt = build_optimizer(obj, o.lr, o.weight_decay, o.betas)
        for x, mask in batches if batches is not None else engine_batches(cfg, obj):
            loss = obj(x, mask=mask).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.process_time() - t0, stamps


def engine(cfg) -> tuple[float, list[float]]:
    with step_stamps() as stamps, contextlib.redirect_stdout(io.StringIO()):
        t0 = time.process_time()
        run_pretrain(cfg)
        return time.process_time() - t0, stamps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="convnextv2_atto")
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = iter(Path(tmp) / f"run{i}" for i in range(10**6))

        def mk(epochs: int):
            return config(str(next(folder)), epochs, a.model, a.decoder_dim)

        if a.profile:
            import cProfile
            import pstats

            engine(mk(1))  # warm-up
            prof = cProfile.Profile()
            prof.runcall(engine, mk(a.epochs))
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
            return
        cfg = mk(a.epochs)
        batches = list(engine_batches(cfg, objective(cfg)))
        n = len(batches)
        engine(mk(1))  # warm-up (imports, allocator, oneDNN kernels)
        bare(mk(1), batches[:4])
        runs = {"bare": lambda: bare(mk(a.epochs), batches),
                "bare + data": lambda: bare(mk(a.epochs), None),
                "engine": lambda: engine(mk(a.epochs))}
        res = {k: {"total": [], "median": [], "mean": []} for k in runs}
        for r in range(a.rounds):
            for k in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                total, stamps = runs[k]()
                assert len(stamps) == n, (k, len(stamps))
                gaps = [b - c for b, c in zip(stamps[1:], stamps)]
                res[k]["median"].append(statistics.median(gaps))
                res[k]["mean"].append(statistics.fmean(gaps))
                res[k]["total"].append(total)
            print(f"round {r}: " + ", ".join(f"{k} {v['total'][-1]:.2f} s" for k, v in res.items()), flush=True)
    med = {k: {q: statistics.median(v) for q, v in d.items()} for k, d in res.items()}
    b, bd, e = med["bare"], med["bare + data"], med["engine"]
    print(f"FCMAE {a.model} (decoder {a.decoder_dim}), 64 px, batch 8, {n} steps, 1 thread, CPU time, "
          f"{a.rounds} rounds (medians)")
    print("| per step (median interval) | ms | vs bare loop | vs bare loop + data path |")
    print("|---|---:|---:|---:|")
    for k in ("bare", "bare + data", "engine"):
        v = med[k]["median"]
        print(f"| {k} | {1000 * v:.1f} | **{v / b['median']:.3f}x** | {v / bd['median']:.3f}x |")
    print(f"mean intervals (epoch ends too): engine / bare {e['mean'] / b['mean']:.3f}x, engine / bare + data "
          f"{e['mean'] / bd['mean']:.3f}x")
    fixed = (e["total"] - n * e["mean"]) - (b["total"] - n * b["mean"])
    print(f"fixed cost per run, engine - bare: {fixed:.2f} s = {fixed / b['median']:.1f} bare steps; whole call at "
          f"{n} steps: engine / bare {e['total'] / b['total']:.3f}x")


if __name__ == "__main__":
    main()
