"""The seeds' transfer claims in miniature, on the scenes benchmark (issue 14).

Per seed: FCMAE / MAE / ConvMAE pretraining on the train scenes' images (labels unused), then the same labelled
budget per row: Mask R-CNN (box / mask AP50 on held-out val scenes) and UperNet (mIoU); Pix2Seq (box AP50) on the
FCMAE-pretrained V2 backbone. The claims:

  convnextv2 FCMAE vs scratch  -> Mask R-CNN box/mask AP50, UperNet mIoU
  convnext (V1) vs convnextv2 (V2), both FCMAE-pretrained (V1 from scratch: the control)
  MAE (vit_tiny) vs ConvMAE (convmae_tiny, the same transformer width), pretrained the same way
  Pix2Seq vs Mask R-CNN on the same pretrained backbone -> box AP50

Each finished run is appended to ``OUT/runs_s{seed}.jsonl`` (a re-run skips it; pretrained encoders are reused),
so one process per seed can run side by side; ``--report`` prints the table (mean ± std over seeds, then every
run) of what ``OUT`` holds. Profiles: ``full`` (128 px, 50 + 24 epochs: hours per row on CPU), ``mini`` (64 px,
what two cores run in ~100 min per seed, one seed per core), ``--quick`` (tiny models, 16 scenes, one seed: runs every row end to
end; its figures mean nothing).

    PYTHONPATH=src python bench/dense_transfer.py --quick --out bench_out/dense_quick
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/dense_transfer.py --profile mini --seeds 0 --out bench_out/dense_mini &
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/dense_transfer.py --profile mini --seeds 1 --out bench_out/dense_mini
    PYTHONPATH=src python bench/dense_transfer.py --report --out bench_out/dense_mini
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

FULL = dict(size=128, max_items=6, train=2000, val=500, pretrain_epochs=50, epochs=24, max_steps=0, batch=16,
            lr=2e-4, pre_batch=64, pre_lr=1.5e-3,
            backbones=dict(v2="convnextv2_atto", v1="convnext_atto", mae="vit_tiny_patch16_224", convmae="convmae_tiny"),
            opts=dict(anchor_size=16, fpn_dim=128, head_dim=128, proposals=300, roi_samples=128, channels=128),
            p2s=dict(dim=256, depth=4, heads=4))
# Measured 98 min per seed, one seed per core: 64-px canvases with 1-3 items, 8
# pretraining epochs (248 steps of 64), 320 fine-tuning steps of 16 per row (2.6 epochs), 300 val scenes.
MINI = dict(FULL, size=64, max_items=3, val=300, pretrain_epochs=8, epochs=3, max_steps=320, lr=3e-4, pre_lr=2e-3,
            opts=dict(anchor_size=8, fpn_dim=64, head_dim=64, proposals=100, roi_samples=64, channels=64))
QUICK = dict(size=64, max_items=6, train=16, val=8, pretrain_epochs=1, epochs=1, max_steps=0, batch=4, lr=1e-3,
             pre_batch=4, pre_lr=1.5e-3,
             backbones=dict(v2="test_convnextv2", v1="test_convnext", mae="test_vit", convmae="test_convmae"),
             opts=dict(anchor_size=8, fpn_dim=32, head_dim=32, proposals=50, roi_samples=32, channels=32),
             p2s=dict(dim=64, depth=1, heads=4))
PROFILES = dict(full=FULL, mini=MINI, quick=QUICK)
OBJECTIVE = dict(v2="fcmae", v1="fcmae", mae="mae", convmae="convmae")
# (backbone key, init): the rows, in the order they run; Pix2Seq runs last, on the v2 FCMAE encoder
# (v1 from scratch: the control that tells what FCMAE pretraining did to V1 from what V1's architecture does)
ROWS = (("v2", None), ("v2", "fcmae"), ("v1", "fcmae"), ("mae", "mae"), ("convmae", "convmae"), ("v1", None))
COLS = ("box_AP50", "mask_AP50", "mIoU")


def _cfg(p: dict, out: Path, data, model: str, seed: int, epochs: int, **kw):
    from maskconv.config import load_config

    o = {"model.name": model, "data.path": str(data), "data.img_size": p["size"], "data.batch_size": p["batch"],
         "data.num_workers": 0, "optim.epochs": epochs, "optim.warmup_epochs": 0.3 if epochs > 1 else 0,
         "optim.lr": p["lr"], "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.95], "run.out": str(out),
         "run.device": "auto", "run.progress": False, "run.log_every_steps": 50, "run.seed": seed,
         "run.save_every_epochs": 1000}
    o.update(kw)
    return load_config(overrides=o)


def pretrain(p, root: Path, key: str, seed: int, images: Path) -> Path:
    """The same objective budget for every encoder: epochs, batch, lr, a 128-wide decoder (MAE / ConvMAE: 2 blocks)."""
    from maskconv.train import run_pretrain

    out = root / f"pre_{key}_s{seed}"
    if not (out / "encoder.safetensors").is_file():
        kw = {"objective.name": OBJECTIVE[key], "optim.lr": p["pre_lr"], "data.batch_size": p["pre_batch"],
              "objective.decoder_dim": 128}
        if key in ("mae", "convmae"):
            kw["objective.decoder_depth"] = 2
        run_pretrain(_cfg(p, out, images, p["backbones"][key], seed, p["pretrain_epochs"], **kw)).run.release()
    return out / "encoder.safetensors"


def run_seed(p: dict, root: Path, seed: int) -> list[dict]:
    """Pretrain the four encoders, then every row; each finished run is appended to ``runs_s{seed}.jsonl`` and
    skipped on a re-run."""
    from maskconv.data.coco import load_coco
    from maskconv.data.scenes import make_scenes
    from maskconv.heads.task import (DenseOptions, SemanticMaps, evaluate_instances, evaluate_segmentation,
                                     run_detect_train, run_segment_train)
    from maskconv.pix2seq.task import Pix2SeqOptions, evaluate_detection, run_pix2seq_train

    train = make_scenes(root / "scenes_train", "train", p["train"], 0, size=p["size"], max_items=p["max_items"]).parent
    val = make_scenes(root / "scenes_val", "val", p["val"], 0, size=p["size"], max_items=p["max_items"]).parent
    val_coco, val_sem = load_coco(val), SemanticMaps(val)
    opts = DenseOptions(**p["opts"])
    log = root / f"runs_s{seed}.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {r["row"] for r in runs}
    steps = {"run.max_steps": p["max_steps"]} if p["max_steps"] else {}

    def record(r: dict) -> None:
        r["seed"] = seed
        runs.append(r)
        with log.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)

    enc = {k: pretrain(p, root, k, seed, train / "images") for k in ("v2", "v1", "mae", "convmae")}
    for key, init in ROWS:
        name = p["backbones"][key]
        tag = f"{name}:{init or 'scratch'}"
        if tag in done:
            continue
        t = time.perf_counter()
        kw = {"model.init": str(enc[key]) if init else "", "optim.layer_decay": 0.8 if init else 1.0, **steps}
        det = run_detect_train(_cfg(p, root / f"det_{key}_{init}_s{seed}", train, name, seed, p["epochs"], **kw), opts)
        r, _ = evaluate_instances(det.model, val_coco)
        seg = run_segment_train(_cfg(p, root / f"seg_{key}_{init}_s{seed}", train, name, seed, p["epochs"], **kw), opts)
        s = evaluate_segmentation(seg.model, val_sem, p["size"])
        record(dict(row=tag, box_AP50=r["AP50"], mask_AP50=r["mask_AP50"], mIoU=s["mIoU"],
                    seconds=round(time.perf_counter() - t)))
    # Pix2Seq on the same FCMAE-pretrained V2 backbone and budget; its box AP50 is compared with the Mask R-CNN
    # row of that backbone (no layer decay here: Pix2Seq's model has no layer ids)
    name = p["backbones"]["v2"]
    if f"{name}:fcmae pix2seq" not in done:
        t = time.perf_counter()
        po = Pix2SeqOptions(max_objects=8, **p["p2s"])
        p2s = run_pix2seq_train(_cfg(p, root / f"p2s_s{seed}", train, name, seed, p["epochs"],
                                     **{"model.init": str(enc["v2"]), **steps}), po)
        record(dict(row=f"{name}:fcmae pix2seq", box_AP50=evaluate_detection(p2s.model, val_coco, po, p["size"])[0]["AP50"],
                    seconds=round(time.perf_counter() - t)))
    return runs


def table(runs: list[dict]) -> str:
    """Markdown: mean ± std over seeds per row (std needs two seeds), then every run."""
    lines = ["| row | seeds | box AP50 | mask AP50 | mIoU |", "|---|---:|---:|---:|---:|"]
    for row in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == row]

        def cell(k):
            v = [r[k] for r in rs if k in r]
            if not v:
                return "–"
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        lines.append(f"| {row} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cell(k) for k in COLS) + " |")
    lines += ["", "| row | seed | " + " | ".join(COLS) + " | s |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["row"], r["seed"])):
        lines.append(f"| {r['row']} | {r['seed']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in COLS)
                     + f" | {r.get('seconds', '–')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/dense_transfer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--quick", action="store_true", help="--profile quick, one seed")
    ap.add_argument("--report", action="store_true", help="only print the table of the runs already in --out")
    args = ap.parse_args()
    p = PROFILES["quick" if args.quick else args.profile]
    seeds = args.seeds[:1] if args.quick else args.seeds
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report:
        for seed in seeds:
            run_seed(p, root, seed)
        print(f"\n{len(seeds)} seed(s), {time.perf_counter() - t0:.0f} s; val: {p['val']} scenes\n")
    runs = [json.loads(line) for f in sorted(root.glob("runs_s*.jsonl")) for line in f.read_text().splitlines()]
    print(table(runs))


if __name__ == "__main__":
    main()
