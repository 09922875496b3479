"""Pix2Seq v2 on the scenes benchmark: one multi-task model vs one model per task, same steps per task.

    PYTHONPATH=src python bench/pix2seq_v2.py --out runs/v2bench            # issue 15's benchmark (hours of CPU)
    PYTHONPATH=src python bench/pix2seq_v2.py --out /tmp/v2q --quick        # a smoke run of the script (minutes)

Trains on ``--train`` scenes (Fashion-MNIST train items) and scores on ``--val`` held-out scenes (t10k items):
bbox AP50, segm AP50 (prompted by ground-truth boxes, and by the model's detections when it has the detection
task), keypoint AP, caption BLEU-4 / CIDEr-D. Each single-task model trains for the same number of steps, so it
sees its task as often as the multi-task model does (the v2 paper's claim: sharing costs little). The same
models are then scored on the val scenes with blank images (the model must read pixels: ~0 expected for
everything prompted by its own detections; ground-truth-box prompts still place masks inside the given box).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _blank_copy(src: Path, dst: Path) -> Path:
    """The val scenes with every image replaced by a uniform grey one (same sizes, same annotations)."""
    import numpy as np
    from PIL import Image

    if not (dst / "annotations.json").is_file():
        (dst / "images").mkdir(parents=True, exist_ok=True)
        for f in (src / "images").iterdir():
            w, h = Image.open(f).size
            Image.fromarray(np.full((h, w), 128, np.uint8)).save(dst / "images" / f.name)
        shutil.copy(src / "annotations.json", dst / "annotations.json")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--backbone", default="convnextv2_atto")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs end to end")
    a = p.parse_args()
    if a.quick:
        a.train, a.val, a.steps, a.backbone, a.img_size, a.batch_size = 16, 8, 20, "test_convnextv2", 64, 4

    from maskconv.config import load_config
    from maskconv.data.coco import load_coco
    from maskconv.data.scenes import make_scenes
    from maskconv.pix2seq.task import Pix2SeqOptions, evaluate_tasks, load_pix2seq, run_pix2seq_train, \
        taskset_from_meta

    out = Path(a.out)
    train = make_scenes(out / "train", "train", a.train, a.seed, size=a.img_size).parent
    val = make_scenes(out / "val", "val", a.val, a.seed, size=a.img_size).parent
    blank = _blank_copy(val, out / "val_blank")
    small = a.img_size <= 64
    base = dict(max_objects=6, seg_max_instances=6, kpt_max_instances=6, seg_max_points=16 if small else 32,
                cap_max_len=64, hflip=False, jitter_min=0.8, jitter_max=1.2)
    if a.quick:
        base.update(dim=32, depth=1, heads=4, max_objects=4, seg_max_instances=3, kpt_max_instances=3, seg_samples=2)
    steps_per_epoch = max(1, a.train // a.batch_size)
    epochs = max(1, -(-a.steps // steps_per_epoch))
    runs = {"det,seg,kpt,cap": "multi", "det": "det", "seg": "seg", "kpt": "kpt", "cap": "cap"}
    table = {}
    for tasks, name in runs.items():
        run = out / f"run_{name}"
        cfg = load_config(overrides={
            "model.name": a.backbone, "data.path": str(train), "data.img_size": a.img_size,
            "data.batch_size": a.batch_size, "data.num_workers": 0, "optim.epochs": epochs,
            "optim.warmup_epochs": 1, "optim.lr": 1e-3, "run.max_steps": a.steps, "run.out": str(run),
            "run.device": "cpu", "run.progress": False, "run.log_every_steps": 100, "run.seed": a.seed})
        t0 = time.perf_counter()
        if not (run / "model.safetensors").is_file():
            run_pix2seq_train(cfg, Pix2SeqOptions(tasks=tasks, **base))
        train_s = time.perf_counter() - t0
        model, meta, o = load_pix2seq(run)
        ts = taskset_from_meta(meta, o)
        r = evaluate_tasks(model, ts, load_coco(val), o, a.img_size, 3, a.batch_size)
        rb = evaluate_tasks(model, ts, load_coco(blank), o, a.img_size, 3, a.batch_size)
        table[name] = {"val": r, "blank": rb, "train_s": train_s}
        print(name, json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)
    (out / "results.json").write_text(json.dumps(table, indent=1))
    keys = [("det", "AP50"), ("seg", "segm_AP50"), ("kpt", "kpt_AP"), ("cap", "BLEU4"), ("cap", "CIDEr")]
    print(f"\n{a.train} train / {a.val} val scenes, {a.steps} steps, {a.backbone} at {a.img_size} px")
    print(f"{'metric':<12}{'multi':>10}{'single':>10}{'multi/single':>14}{'multi blank':>13}")
    for task, k in keys:
        m, s = table["multi"]["val"][k], table[task]["val"][k]
        print(f"{k:<12}{m:>10.4f}{s:>10.4f}{(m / s if s else float('nan')):>14.3f}"
              f"{table['multi']['blank'][k]:>13.4f}")
    for k in ("segm_det_AP50", "kpt_det_AP"):
        print(f"{k:<12}{table['multi']['val'][k]:>10.4f}{'':>10}{'':>14}{table['multi']['blank'][k]:>13.4f}")


if __name__ == "__main__":
    main()
