"""The seeds' transfer claims in miniature, on the scenes benchmark (issue 14; issue 13's Faster R-CNN baseline).

Per seed: FCMAE / MAE / ConvMAE pretraining on the train scenes' images (labels unused), then the same labelled
budget per row: Mask R-CNN (box / mask AP50 on held-out val scenes), UperNet (mIoU), Faster R-CNN and Pix2Seq
(box AP50) on the same pretrained backbone. Rows:

  convnextv2 FCMAE vs scratch  -> Mask R-CNN box/mask AP50, UperNet mIoU
  convnext (V1) vs convnextv2 (V2), both FCMAE-pretrained
  MAE (ViT) vs ConvMAE, pretrained the same way -> box AP50, mIoU
  Pix2Seq vs Faster R-CNN on the same pretrained backbone -> box AP50

Prints a table of mean ± std over seeds (and every run's figures) as Markdown. ``--quick``: tiny models, a few
scenes and steps, one seed: checks that every row runs end to end (its figures mean nothing).

    PYTHONPATH=src python bench/dense_transfer.py --quick --out bench_out/dense_quick
    PYTHONPATH=src python bench/dense_transfer.py --seeds 0 1 --out bench_out/dense   # the table (hours of CPU)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

FULL = dict(size=128, train=2000, val=500, pretrain_epochs=50, epochs=24, batch=16, lr=2e-4,
            backbones=dict(v2="convnextv2_atto", v1="convnext_atto", mae="vit_tiny_patch16_224", convmae="convmae_small"),
            opts=dict(anchor_size=16, fpn_dim=128, head_dim=128, proposals=300, roi_samples=128, channels=128))
QUICK = dict(size=64, train=16, val=8, pretrain_epochs=1, epochs=1, batch=4, lr=1e-3,
             backbones=dict(v2="test_convnextv2", v1="test_convnext", mae="test_vit", convmae="test_convmae"),
             opts=dict(anchor_size=8, fpn_dim=32, head_dim=32, proposals=50, roi_samples=32, channels=32))
OBJECTIVE = dict(v2="fcmae", v1="fcmae", mae="mae", convmae="convmae")


def _cfg(p: dict, out: Path, data, model: str, seed: int, epochs: int, **kw):
    from maskconv.config import load_config

    o = {"model.name": model, "data.path": str(data), "data.img_size": p["size"], "data.batch_size": p["batch"],
         "data.num_workers": 0, "optim.epochs": epochs, "optim.warmup_epochs": min(1, epochs - 1) if epochs > 1 else 0,
         "optim.lr": p["lr"], "run.out": str(out), "run.device": "auto", "run.progress": False,
         "run.log_every_steps": 50, "run.seed": seed, "run.save_every_epochs": 1000}
    o.update(kw)
    return load_config(overrides=o)


def pretrain(p, root: Path, key: str, seed: int, images: Path) -> Path:
    from maskconv.train import run_pretrain

    out = root / f"pre_{key}_s{seed}"
    if not (out / "encoder.safetensors").is_file():
        kw = {"objective.name": OBJECTIVE[key], "optim.lr": 1.5e-3}
        run_pretrain(_cfg(p, out, images, p["backbones"][key], seed, p["pretrain_epochs"], **kw)).run.release()
    return out / "encoder.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/dense_transfer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from maskconv.data.coco import load_coco
    from maskconv.data.scenes import make_scenes
    from maskconv.heads.task import (DenseOptions, SemanticMaps, evaluate_instances, evaluate_segmentation,
                                     run_detect_train, run_segment_train)
    from maskconv.pix2seq.task import Pix2SeqOptions, evaluate_detection, run_pix2seq_train

    p = QUICK if args.quick else FULL
    seeds = args.seeds[:1] if args.quick else args.seeds
    root = Path(args.out)
    train = make_scenes(root / "scenes_train", "train", p["train"], 0, size=p["size"]).parent
    val = make_scenes(root / "scenes_val", "val", p["val"], 0, size=p["size"]).parent
    val_coco, val_sem = load_coco(val), SemanticMaps(val)
    opts = DenseOptions(**p["opts"])
    runs: list[dict] = []
    t0 = time.perf_counter()
    for seed in seeds:
        enc = {k: pretrain(p, root, k, seed, train / "images") for k in ("v2", "v1", "mae", "convmae")}
        for key, init in (("v2", None), ("v2", "fcmae"), ("v1", "fcmae"), ("mae", "mae"), ("convmae", "convmae")):
            name = p["backbones"][key]
            tag = f"{name}:{init or 'scratch'}"
            kw = {"model.init": str(enc[key]) if init else "", "optim.layer_decay": 0.8 if init else 1.0}
            det = run_detect_train(_cfg(p, root / f"det_{key}_{init}_s{seed}", train, name, seed, p["epochs"], **kw), opts)
            r, _ = evaluate_instances(det.model, val_coco)
            seg = run_segment_train(_cfg(p, root / f"seg_{key}_{init}_s{seed}", train, name, seed, p["epochs"], **kw), opts)
            s = evaluate_segmentation(seg.model, val_sem, p["size"])
            runs.append(dict(row=tag, seed=seed, box_AP50=r["AP50"], mask_AP50=r["mask_AP50"], mIoU=s["mIoU"]))
            print(json.dumps(runs[-1]), flush=True)
        # Pix2Seq vs Faster R-CNN on the same FCMAE-pretrained V2 backbone and budget (no layer decay for either:
        # Pix2Seq's model has no layer ids)
        name, kw = p["backbones"]["v2"], {"model.init": str(enc["v2"])}
        frc = run_detect_train(_cfg(p, root / f"frcnn_s{seed}", train, name, seed, p["epochs"], **kw),
                               DenseOptions(**{**p["opts"], "masks": False}))
        po = Pix2SeqOptions(max_objects=8, dim=64 if args.quick else 256, depth=1 if args.quick else 4, heads=4)
        p2s = run_pix2seq_train(_cfg(p, root / f"p2s_s{seed}", train, name, seed, p["epochs"], **kw), po)
        runs.append(dict(row=f"{name}:fcmae faster-rcnn", seed=seed,
                         box_AP50=evaluate_instances(frc.model, val_coco)[0]["AP50"]))
        runs.append(dict(row=f"{name}:fcmae pix2seq", seed=seed,
                         box_AP50=evaluate_detection(p2s.model, val_coco, po, p["size"])[0]["AP50"]))
        print(json.dumps(runs[-2]), json.dumps(runs[-1]), flush=True)
    (root / "runs.json").write_text(json.dumps(runs, indent=1))
    print(f"\n{len(seeds)} seed(s), {time.perf_counter() - t0:.0f} s; val: {p['val']} scenes\n")
    print("| row | seeds | box AP50 | mask AP50 | mIoU |\n|---|---:|---:|---:|---:|")
    for row in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == row]

        def cell(k):
            v = [r[k] for r in rs if k in r]
            if not v:
                return "–"
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        print(f"| {row} | {len(rs)} | {cell('box_AP50')} | {cell('mask_AP50')} | {cell('mIoU')} |")


if __name__ == "__main__":
    main()
