"""Pix2Seq v2 on the scenes benchmark: one multi-task model vs one model per task, same steps per task.

    # issue 15's benchmark in miniature (64 px; one process per core, each run skipped once its result exists):
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/pix2seq_v2.py --profile mini --runs multi det --out bench_out/v2 &
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/pix2seq_v2.py --profile mini --runs seg kpt cap --out bench_out/v2
    PYTHONPATH=src python bench/pix2seq_v2.py --profile mini --report --out bench_out/v2
    PYTHONPATH=src python bench/pix2seq_v2.py --profile quick --out /tmp/v2q    # a smoke run of the script (minutes)

Trains on ``train`` scenes (Fashion-MNIST train items) and scores on ``val`` held-out scenes (t10k items):
bbox AP50, segm AP50 (prompted by ground-truth boxes, and by the model's detections when it has the detection
task), keypoint AP, caption BLEU-4 / CIDEr-D. Each single-task model trains for the same number of steps, so it
sees its task as often as the multi-task model does (the v2 paper's claim: sharing costs little). The same
models are then scored on blank copies of the first ``blank`` val scenes (the model must read pixels: ~0 expected
for everything prompted by its own detections; ground-truth-box prompts still place masks inside the given box).
Profiles: ``full`` (128 px, 1-6 items, the official 6 x 256 decoder: hours per run on CPU), ``mini`` (64 px, 1-3
items, a 4 x 256 decoder, 1,000 steps of 16 = 8 epochs; measured on one thread beside a second run: 54 min for
the multi-task model, 10-30 min for each single-task one, 12 min to score the multi-task one), ``quick`` (smoke).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FULL = dict(size=128, max_items=6, train=2000, val=1000, blank=300, steps=3000, batch=16, lr=1e-3,
            backbone="convnextv2_atto", eval_batch=32,
            opts=dict(max_objects=6, seg_max_instances=6, kpt_max_instances=6, seg_max_points=32, cap_max_len=64,
                      hflip=False, jitter_min=0.8, jitter_max=1.2))
MINI = dict(FULL, size=64, max_items=3, steps=1000, opts=dict(FULL["opts"], max_objects=4, seg_max_instances=3,
                                                              kpt_max_instances=3, seg_max_points=16, dim=256,
                                                              depth=4, heads=4))
QUICK = dict(size=64, max_items=6, train=16, val=8, blank=8, steps=20, batch=4, lr=1e-3, backbone="test_convnextv2",
             eval_batch=4, opts=dict(FULL["opts"], dim=32, depth=1, heads=4, max_objects=4, seg_max_instances=3,
                                     kpt_max_instances=3, seg_max_points=16, seg_samples=2))
PROFILES = dict(full=FULL, mini=MINI, quick=QUICK)
RUNS = {"multi": "det,seg,kpt,cap", "det": "det", "seg": "seg", "kpt": "kpt", "cap": "cap"}
KEYS = [("det", "AP50"), ("seg", "segm_AP50"), ("kpt", "kpt_AP"), ("cap", "BLEU4"), ("cap", "CIDEr")]


def _blank_copy(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` val scenes with every image replaced by a uniform grey one (same sizes, same annotations)."""
    import numpy as np
    from PIL import Image

    js = dst / "annotations.json"
    if not js.is_file():
        (dst / "images").mkdir(parents=True, exist_ok=True)
        ann = json.loads((src / "annotations.json").read_text())
        ann["images"] = ann["images"][:n]
        keep = {im["id"] for im in ann["images"]}
        for key in ("annotations", "captions"):  # every list keyed by image
            if key in ann:
                ann[key] = [a for a in ann[key] if a["image_id"] in keep]
        for im in ann["images"]:
            w, h = Image.open(src / "images" / im["file_name"]).size
            Image.fromarray(np.full((h, w), 128, np.uint8)).save(dst / "images" / im["file_name"])
        tmp = js.with_suffix(".tmp")
        tmp.write_text(json.dumps(ann))
        tmp.replace(js)
    return dst


def prompt_only(val: Path, kpt_sigmas: str = "") -> dict:
    """What a ground-truth box alone scores, without looking at pixels: the filled box as the mask (segm AP50) and
    the box edges' midpoints as the scenes' top / left / bottom / right keypoints (keypoint AP). Segmentation and
    keypoints prompted by ground-truth boxes must beat these to show they read the image."""
    import numpy as np

    from maskconv.data.coco import coco_evaluate, load_coco
    from maskconv.pix2seq.metrics import keypoint_result, mask_result
    from maskconv.pix2seq.multitask import keypoint_sigmas

    data = load_coco(val)
    gt = data.gt
    size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    masks, kpts = [], []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        m = np.zeros(size[a["image_id"]], bool)
        m[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = True
        masks.append(mask_result(m, a["image_id"], a["category_id"], 1.0))
        pts = np.array([[x + w / 2, y], [x, y + h / 2], [x + w / 2, y + h], [x + w, y + h / 2]])  # t, l, b, r
        kpts.append(keypoint_result(pts, a["image_id"], a["category_id"], 1.0))
    k = len(data.keypoint_names or ())
    segm = coco_evaluate(gt, masks, iou_type="segm")
    return {"segm_AP": segm["AP"], "segm_AP50": segm["AP50"],
            "kpt_AP": coco_evaluate(gt, kpts, iou_type="keypoints", kpt_oks_sigmas=keypoint_sigmas(kpt_sigmas, k))["AP"]}


def _run(name: str, p: dict, out: Path, train: Path, val: Path, blank: Path, seed: int) -> dict:
    """Train (unless its weights exist) and score one run; its result is written to ``result_{name}.json``."""
    from maskconv.config import load_config
    from maskconv.data.coco import load_coco
    from maskconv.pix2seq.task import Pix2SeqOptions, evaluate_tasks, load_pix2seq, run_pix2seq_train, \
        taskset_from_meta

    done = out / f"result_{name}.json"
    if done.is_file():
        r = json.loads(done.read_text())
        if (r["steps"], r["seed"]) != (p["steps"], seed):  # never mix budgets in one table
            raise SystemExit(f"{done} was measured with {r['steps']} steps, seed {r['seed']}; this run asks "
                             f"{p['steps']}, seed {seed}: choose another --out")
        return r
    run = out / f"run_{name}"
    steps_per_epoch = max(1, p["train"] // p["batch"])
    epochs = max(1, -(-p["steps"] // steps_per_epoch))
    cfg = load_config(overrides={
        "model.name": p["backbone"], "data.path": str(train), "data.img_size": p["size"],
        "data.batch_size": p["batch"], "data.num_workers": 0, "optim.epochs": epochs,
        "optim.warmup_epochs": min(1, epochs / 10), "optim.lr": p["lr"], "run.max_steps": p["steps"],
        "run.out": str(run), "run.device": "cpu", "run.progress": False, "run.log_every_steps": 100,
        "run.seed": seed})
    train_s = None  # weights from an earlier process (stopped while scoring): its training time was not measured
    if not (run / "model.safetensors").is_file():
        t0 = time.perf_counter()
        run_pix2seq_train(cfg, Pix2SeqOptions(tasks=RUNS[name], **p["opts"]))
        train_s = round(time.perf_counter() - t0)
    model, meta, o = load_pix2seq(run)
    ts = taskset_from_meta(meta, o)
    t0 = time.perf_counter()
    r = evaluate_tasks(model, ts, load_coco(val), o, p["size"], 3, p["eval_batch"])
    eval_s = time.perf_counter() - t0
    rb = evaluate_tasks(model, ts, load_coco(blank), o, p["size"], 3, p["eval_batch"])
    res = dict(run=name, tasks=RUNS[name], val=r, blank=rb, train_s=train_s, eval_s=round(eval_s),
               steps=p["steps"], seed=seed)
    done.write_text(json.dumps(res, indent=1))
    print(name, json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)
    return res


def report(out: Path, p: dict) -> None:
    """The multi-task vs single-task table from whatever results ``out`` holds."""
    table = {n: json.loads((out / f"result_{n}.json").read_text()) for n in RUNS if (out / f"result_{n}.json").is_file()}
    if "multi" not in table:
        raise SystemExit(f"{out}: no result_multi.json yet")
    m = table["multi"]
    if len({(r["steps"], r["seed"]) for r in table.values()}) > 1:
        raise SystemExit(f"{out}: the runs differ in steps or seed: {[(n, r['steps'], r['seed']) for n, r in table.items()]}")
    print(f"\n{p['train']} train / {p['val']} val scenes ({p['blank']} blank), {m['steps']} steps of {p['batch']}, "
          f"{p['backbone']} at {p['size']} px, seed {m['seed']}")
    print("| metric | multi-task | single-task | multi / single | multi, blank | single, blank |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, k in KEYS:
        s = table.get(task)
        mv, sv = m["val"][k], (s["val"][k] if s else float("nan"))
        ratio = mv / sv if s and sv else float("nan")
        sb = f"{s['blank'][k]:.4f}" if s else "–"
        print(f"| {k} | {mv:.4f} | {sv:.4f} | {ratio:.3f} | {m['blank'][k]:.4f} | {sb} |")
    for k in ("segm_det_AP50", "kpt_det_AP"):
        print(f"| {k} | {m['val'][k]:.4f} | – | – | {m['blank'][k]:.4f} | – |")
    base = prompt_only(out / "val", p["opts"].get("kpt_sigmas", ""))
    print(f"\nthe ground-truth box alone (no pixels): filled box as mask segm_AP50 {base['segm_AP50']:.4f} "
          f"(segm_AP {base['segm_AP']:.4f}); "
          f"edge midpoints as keypoints kpt_AP {base['kpt_AP']:.4f}")
    print("\n| run | train min | eval min (val) |\n|---|---:|---:|")
    for n, r in table.items():
        train = "–" if r["train_s"] is None else f"{r['train_s'] / 60:.1f}"
        print(f"| {n} ({r['tasks']}) | {train} | {r['eval_s'] / 60:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="mini")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs this process does")
    ap.add_argument("--steps", type=int, default=0, help="override the profile's steps per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="print the table of the finished runs, train nothing")
    a = ap.parse_args()
    p = dict(PROFILES[a.profile])
    if a.steps:
        p["steps"] = a.steps
    out = Path(a.out)
    if a.report:
        return report(out, p)

    from maskconv.data.scenes import make_scenes

    kw = dict(size=p["size"], max_items=p["max_items"])
    train = make_scenes(out / "train", "train", p["train"], a.seed, **kw).parent
    val = make_scenes(out / "val", "val", p["val"], a.seed, **kw).parent
    blank = _blank_copy(val, out / "val_blank", p["blank"])
    for name in a.runs:
        _run(name, p, out, train, val, blank, a.seed)
    report(out, p)


if __name__ == "__main__":
    main()
