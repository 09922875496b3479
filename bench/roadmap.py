"""The ConvNeXt roadmap in miniature: every step of ``maskconv roadmap`` (ResNet-50 -> ConvNeXt-T, ConvNeXt paper
Section 2 / Figure 2) trained with one recipe and one budget on Fashion-MNIST, several seeds; test top-1 per step
beside the paper's ImageNet curve, and for each step whether its direction (better / worse than the step it
modifies) agrees with the paper's, with the seeds' uncertainty. Every finished run is skipped on a re-run.

    .venv/bin/python bench/roadmap.py --out bench_out/roadmap --seeds 0 1 2 --steps 3000
    .venv/bin/python bench/roadmap.py --quick          # a few steps, one seed, 64 test images: shows it runs
    # on a CPU: every step at a quarter of its width (16 / 24 instead of 64 / 96; each step's change kept)
    OMP_NUM_THREADS=1 .venv/bin/python bench/roadmap.py --width-mult 0.25 --seeds 0 --steps 300 --out bench_out/rm_q

Fashion-MNIST at 32 px (28 px padded by the resize), one channel; ``--patch-size 2`` gives stage maps 16/8/4/2
(the paper's stride-4 stem would leave 1×1 maps). The networks are the paper's widths and depths (15-34M params):
use a GPU for the full run (``run.device=auto`` picks it), or ``--width-mult`` (``model.width_mult``: narrow copies)
on a CPU. Needs Debian's dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from maskconv.tasks.classify import evaluate_classifier, run_finetune
from maskconv.config import DataCfg, load_config
from maskconv.data.build import build_transform
from maskconv.data.datasets import FashionMNIST, SeededDataset, collate_skip
from maskconv.rebuild import load_trained
from maskconv.models.roadmap import ROADMAP, step_model_name
from maskconv.viz.roadmap import plot_roadmap, roadmap_table

TRAIN_IMAGES = 60_000


def _recipe(name: str, run: Path, seed: int, a) -> list[str]:
    """One recipe for every step (AdamW + cosine, label smoothing, drop path; the budget in optimizer steps)."""
    epochs = max(1, math.ceil(a.steps * a.batch_size / TRAIN_IMAGES))
    warmup = min(0.5 * epochs, 0.1 * a.steps * a.batch_size / TRAIN_IMAGES)  # 10% of the steps
    return [f"model.name={name}", "model.in_chans=1", f"model.stem_stride={a.patch_size}", "model.drop_path_rate=0.1",
            f"model.width_mult={a.width_mult}",
            "data.path=fashion-mnist", "data.img_size=32", f"data.batch_size={a.batch_size}", "data.num_workers=0",
            "data.crop_scale_min=0.5", "data.label_smoothing=0.1", f"optim.epochs={epochs}",
            f"optim.warmup_epochs={warmup}", f"optim.blr={a.blr}", "optim.weight_decay=0.05",
            "optim.betas=[0.9,0.999]", f"run.max_steps={a.steps}", f"run.out={run}", f"run.seed={seed}",
            "run.progress=false", "run.eval_every_epochs=1000", f"run.log_every_steps={max(1, a.steps // 20)}",
            f"run.save_every_epochs={epochs}"]


def _test_top1(run: Path, a) -> tuple[float, int]:
    model = load_trained(run).model  # the run's own architecture (stem stride, width) and weights
    ds = FashionMNIST(train=False, in_chans=1)
    if a.test_limit:
        ds = Subset(ds, range(min(a.test_limit, len(ds))))
    tf = build_transform(DataCfg(path="fashion-mnist", img_size=32), 1, train=False)
    loader = DataLoader(SeededDataset(ds, tf, replace_bad=False), batch_size=256, collate_fn=collate_skip)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = evaluate_classifier(model.to(device), loader, 10, device, progress=False)
    return r["val_top1"], r["val_images"]


def _train(index: int, seed: int, a) -> dict:
    name = step_model_name(index)
    run = Path(a.out) / f"{name}_s{seed}"
    done = run / "result.json"
    if done.is_file():
        r = json.loads(done.read_text())
        have = {k: r.get(k, 1.0 if k == "width_mult" else None) for k in ("steps", "batch_size", "width_mult")}
        want = dict(steps=a.steps, batch_size=a.batch_size, width_mult=a.width_mult)
        if have != want:  # never mix budgets or widths in one table
            raise SystemExit(f"{done} was measured with {have}, this run asks {want}: choose another --out")
        return r
    cfg = load_config(None, _recipe(name, run, seed, a))
    cfg.task = "finetune"
    run_finetune(cfg)
    top1, n = _test_top1(run, a)
    result = dict(model=name, step=index, seed=seed, steps=a.steps, batch_size=a.batch_size, width_mult=a.width_mult,
                  test_top1=top1,
                  test_images=n)
    done.write_text(json.dumps(result))
    if not a.keep_weights:  # 17 steps x seeds x (weights + optimizer state) would be tens of GB
        for f in ("model.safetensors", "last.pt"):
            (run / f).unlink(missing_ok=True)
    return result


def _compare(acc: dict[int, list[float]], i: int, p: int, paper: float | None, change: str) -> dict:
    """Step ``i`` against step ``p``: the paper's change in top-1, ours (mean over seeds) with its standard error,
    and the verdict: 'agrees' / 'disagrees' when ours is beyond 2 standard errors, else 'within noise'."""
    ours = statistics.fmean(acc[i]) - statistics.fmean(acc[p])
    n_i, n_p = len(acc[i]), len(acc[p])
    se = math.sqrt((statistics.variance(acc[i]) / n_i if n_i > 1 else 0.0)
                   + (statistics.variance(acc[p]) / n_p if n_p > 1 else 0.0))
    if paper is None or min(n_i, n_p) < 2:
        verdict = "n/a" if paper is None else "one seed"
    elif abs(ours) <= 2 * se:
        verdict = "within noise"
    else:
        verdict = "agrees" if paper != 0 and (ours > 0) == (paper > 0) else "disagrees"
    return dict(step=i, parent=p, change=change, paper_delta=paper, ours_delta=round(ours, 2), se=round(se, 2),
                verdict=verdict)


def _directions(acc: dict[int, list[float]]) -> list[dict]:
    """Per step, its comparison with the step it modifies (``_compare``); last, the whole road (step 0 -> the
    last step) where both were trained."""
    out = []
    for i, step in enumerate(ROADMAP):
        p = step.parent
        if p is None or i not in acc or p not in acc:
            continue
        paper = None if step.top1 is None or ROADMAP[p].top1 is None else round(step.top1 - ROADMAP[p].top1, 1)
        out.append(_compare(acc, i, p, paper, step.change))
    last = len(ROADMAP) - 1
    if 0 in acc and last in acc:
        out.append(_compare(acc, last, 0, round(ROADMAP[last].top1 - ROADMAP[0].top1, 1), "the whole road"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/roadmap")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (the one budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--blr", type=float, default=1e-3, help="base lr for a batch of 256 (AdamW)")
    p.add_argument("--patch-size", type=int, default=2, help="stem stride at 32 px (the paper's 4 suits 224 px)")
    p.add_argument("--width-mult", type=float, default=1.0, help="every step's width times this (0.25: CPU-sized)")
    p.add_argument("--models", type=int, nargs="+", default=None, help="step indices (default: all)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all 10k)")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's weights and last.pt")
    p.add_argument("--quick", action="store_true", help="3 steps, seed 0, batch 16, 64 test images (smoke run)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.seeds, a.batch_size, a.test_limit = 3, [0], 16, 64
        a.out = a.out if a.out != p.get_default("out") else "bench_out/roadmap_quick"
    steps = a.models if a.models is not None else list(range(len(ROADMAP)))
    bad = [i for i in steps if not 0 <= i < len(ROADMAP)]
    if bad:
        p.error(f"--models {bad}: steps are 0..{len(ROADMAP) - 1}")
    acc: dict[int, list[float]] = {}
    results = []
    for i in steps:
        for seed in a.seeds:
            r = _train(i, seed, a)
            results.append(r)
            acc.setdefault(i, []).append(r["test_top1"])
            print(f"{r['model']} seed {seed}: test top-1 {r['test_top1']:.2f}% ({r['test_images']} images)", flush=True)
    rows = roadmap_table(224)
    out = Path(a.out)
    width = "" if a.width_mult == 1 else f", width x{a.width_mult:g}"
    label = f"Fashion-MNIST 32 px{width}, {a.steps} steps x {a.batch_size}, {len(a.seeds)} seed(s)"
    fig = plot_roadmap([r for r in rows if r.index in acc], out / "roadmap_fmnist.png", acc, measured_label=label)
    dirs = _directions(acc)
    (out / "results.json").write_text(json.dumps(dict(args=vars(a), runs=results, directions=dirs), indent=1))
    print(f"\n| # | change | paper top-1 | ours ({label}) |\n|---|---|---|---|")
    for i in steps:
        m, s = statistics.fmean(acc[i]), (statistics.stdev(acc[i]) if len(acc[i]) > 1 else 0.0)
        paper = ROADMAP[i].top1
        print(f"| {i} | {ROADMAP[i].change} | {'' if paper is None else paper} | {m:.2f} ± {s:.2f} |")
    print("\n| steps | change | paper Δ | ours Δ ± s.e. | verdict |\n|---|---|---|---|---|")
    for d in dirs:
        pd = "" if d["paper_delta"] is None else f"{d['paper_delta']:+.1f}"
        print(f"| {d['parent']} → {d['step']} | {d['change']} | {pd} | {d['ours_delta']:+.2f} ± {d['se']:.2f} | {d['verdict']} |")
    print(f"\nwrote {fig} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
