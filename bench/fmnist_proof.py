"""The proof on real data: FCMAE-pretrain ConvNeXt V2 on the 60k Fashion-MNIST training images without labels,
fine-tune with 100 labels per class, compare with the same fine-tuning from scratch (several seeds), plus a
linear probe and the feature-collapse numbers. Every finished run is skipped on a re-run (resumable).

    .venv/bin/python bench/fmnist_proof.py --out bench_out/fmnist [--seeds 0 1 2] [--pretrain-epochs 3]
        [--finetune-epochs 30] [--versions v2 v1]

Needs Debian's dataset-fashion-mnist. Slow (tens of minutes per pretraining epoch set on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from maskconv.tasks.classify import run_finetune, run_linprobe
from maskconv.tasks.pretrain import run_pretrain
from maskconv.tasks.visualize import run_visualize_collapse
from maskconv.config import load_config

MODELS = {"v2": "convnextv2_atto", "v1": "convnext_atto"}


def _done(run: Path) -> bool:
    return (run / "model.safetensors").is_file() or (run / "encoder.safetensors").is_file()


def _top1(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_top1" in x]
    return rows[-1]["val_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/fmnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--versions", nargs="+", default=["v2", "v1"], choices=sorted(MODELS),
                   help="pretrain each (for the collapse comparison)")
    p.add_argument("--finetune-versions", nargs="+", default=["v2"], choices=sorted(MODELS),
                   help="fine-tune / probe these (pretrained vs scratch)")
    p.add_argument("--pretrained-run", default=None, help="reuse this v2 pretraining run folder")
    a = p.parse_args()
    out = Path(a.out)
    common = ["data.num_workers=0", "run.progress=false", "run.eval_every_epochs=1000"]
    table = {}
    for v in a.versions:
        name = MODELS[v]
        pre = Path(a.pretrained_run) if (a.pretrained_run and v == "v2") else out / f"pretrain_{v}"
        if not _done(pre):
            cfg = load_config("fmnist_fcmae_pretrain", [f"model.name={name}", f"run.out={pre}",
                                                        f"optim.epochs={a.pretrain_epochs}", "optim.warmup_epochs=0.5",
                                                        "run.log_every_steps=20", *common])
            run_pretrain(cfg)
        if v not in a.finetune_versions:
            continue
        for init, tag in ((pre / "encoder.safetensors", "fcmae"), (None, "scratch")):
            accs = []
            for seed in a.seeds:
                run = out / f"ft_{v}_{tag}_s{seed}"
                if not _done(run):
                    ov = [f"model.name={name}", f"run.out={run}", f"run.seed={seed}",
                          f"optim.epochs={a.finetune_epochs}", *common]
                    if init:
                        ov.append(f"model.init={init}")
                    cfg = load_config("fmnist_finetune_100pc", ov)
                    cfg.task = "finetune"
                    run_finetune(cfg)
                accs.append(_top1(run))
            table[f"{name} {tag}"] = accs
        lp = out / f"linprobe_{v}"
        if not _done(lp):
            init = pre / "encoder.safetensors"
            cfg = load_config("fmnist_finetune_100pc", [f"model.name={name}", f"run.out={lp}", f"model.init={init}",
                                                         "optim.epochs=20", "optim.blr=0.1", "optim.weight_decay=0",
                                                         "optim.layer_decay=1.0", "model.drop_path_rate=0", *common])
            cfg.task = "linprobe"
            run_linprobe(cfg)
        table[f"{name} linear probe (fcmae)"] = [_top1(lp)]
    runs = [str(out / f"pretrain_{v}") if not (a.pretrained_run and v == "v2") else a.pretrained_run
            for v in a.versions]
    run_visualize_collapse(runs, "fashion-mnist", out / "collapse.png", limit=256)
    print("\n| run | test top-1 per seed | mean ± std |\n|---|---|---:|")
    for k, accs in table.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {k} | {', '.join(f'{x:.2f}' for x in accs)} | {statistics.mean(accs):.2f} ± {sd:.2f} |")


if __name__ == "__main__":
    main()
