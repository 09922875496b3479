"""Issue 13's held-out gate, scored: trained Pix2Seq (and detector) runs on the val scenes, grouped by row.

Per run: class-aware COCO AP / AP50 / AP75, the same detections scored class-agnostic (every box one category:
does it find the items, whatever it calls them), and two controls on the first ``--controls`` val images with
their ground truth kept: all-black canvases and each canvas's pixels shuffled (the same permutation over the
channels). ``class_acc_found``: of the objects found (IoU >= 0.5), the share whose best detection names the
right class (chance: 1 / classes). A model that reads pixels scores < 0.05 on both; one that writes its priors does not. Per row:
mean ± std over its runs (seeds). Pix2Seq decodes with its run's sampling settings (top-p), seeded per run, so
a re-run prints the same figures.

Train the runs first (README / BENCHMARKS.md "The gate on this CPU"), then:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/pix2seq_gate.py --val scenes_val \
        --runs scratch=run_s0,run_s1 fcmae=run_fcmae_s0,run_fcmae_s1 faster-rcnn=frcnn_s0 --out bench_out/gate
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch


def controls(val: Path, out: Path, n: int) -> dict[str, Path]:
    """COCO folders of the first ``n`` val images made blank / pixel-shuffled, ground truth unchanged."""
    from PIL import Image

    from maskconv.data.coco import find_annotations

    js = find_annotations(val)
    gt = json.loads(js.read_text())
    images = gt["images"][:n]
    keep = {im["id"] for im in images}
    sub = {**gt, "images": images, **{k: [a for a in gt[k] if a["image_id"] in keep]
                                       for k in ("annotations", "captions") if k in gt}}
    rng = np.random.default_rng(0)
    made = {}
    for kind in ("blank", "shuffled"):
        root = out / f"control_{kind}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        for im in images:
            a = np.asarray(Image.open(js.parent / "images" / im["file_name"]))
            if kind == "blank":
                a = np.zeros_like(a)
            else:
                flat = a.reshape(a.shape[0] * a.shape[1], -1)
                a = flat[rng.permutation(len(flat))].reshape(a.shape)
            Image.fromarray(a).save(root / "images" / im["file_name"])
        (root / "annotations.json").write_text(json.dumps(sub))
        made[kind] = root
    return made


def class_accuracy(gt: dict, dets: list[dict]) -> tuple[float, int]:
    """Of the ground-truth objects some detection finds (IoU >= 0.5, classes ignored), the fraction whose
    best-scoring such detection names the right class, and how many were found: localisation and
    classification apart."""
    from torchvision.ops import box_convert, box_iou

    def xyxy(boxes):  # COCO xywh -> (N, 4) xyxy
        return box_convert(torch.tensor(boxes, dtype=torch.float64), "xywh", "xyxy")

    by_image: dict = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    found = right = 0
    for a in gt["annotations"]:
        ds = by_image.get(a["image_id"], [])
        if a.get("iscrowd", 0) or not ds:
            continue
        iou = box_iou(xyxy([a["bbox"]]), xyxy([d["bbox"] for d in ds]))[0]
        hits = [d for d, v in zip(ds, iou.tolist()) if v >= 0.5]
        if hits:
            found += 1
            right += max(hits, key=lambda d: d["score"])["category_id"] == a["category_id"]
    return (right / found if found else float("nan")), found


def score(run: Path, data, seed: int = 0) -> tuple[dict, list[dict]]:
    """(COCO figures, detections) of a Pix2Seq or detect run on ``data`` (a CocoData)."""
    torch.manual_seed(seed)  # Pix2Seq samples its tokens (top-p): a fixed draw per run
    if (run / "pix2seq.json").is_file():
        from maskconv.pix2seq.task import evaluate_detection, load_pix2seq

        model, meta, o = load_pix2seq(run)
        return evaluate_detection(model, data, o, meta["img_size"], meta["in_chans"], batch_size=32)
    from maskconv.heads.task import evaluate_instances, load_dense

    model, meta, _ = load_dense(run, "detect")
    return evaluate_instances(model, data, meta["in_chans"], batch_size=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", required=True, help="COCO folder of the held-out scenes")
    ap.add_argument("--runs", nargs="+", required=True, help="ROW=RUN[,RUN...]: one row per name, a run per seed")
    ap.add_argument("--controls", type=int, default=300, help="val images made blank / shuffled")
    ap.add_argument("--out", default="bench_out/pix2seq_gate")
    a = ap.parse_args()
    from maskconv.data.coco import coco_evaluate, load_coco

    out = Path(a.out)
    rows = {}
    for spec in a.runs:
        name, _, runs = spec.partition("=")
        if not runs:
            raise SystemExit(f"--runs {spec!r}: write ROW=RUN[,RUN...]")
        rows[name] = [Path(r) for r in runs.split(",")]
    val = load_coco(a.val)
    ctl = {k: load_coco(p) for k, p in controls(Path(a.val), out, a.controls).items()}
    results = []
    for name, runs in rows.items():
        for run in runs:
            r, dets = score(run, val)
            rec = dict(row=name, run=str(run), AP=r["AP"], AP50=r["AP50"], AP75=r["AP75"],
                       AP50_agnostic=coco_evaluate(val.gt, dets, class_agnostic=True)["AP50"])
            rec["class_acc_found"], rec["found"] = class_accuracy(val.gt, dets)
            for kind, data in ctl.items():
                rc, dc = score(run, data)
                rec[f"{kind}_AP50"] = rc["AP50"]
                rec[f"{kind}_AP50_agnostic"] = coco_evaluate(data.gt, dc, class_agnostic=True)["AP50"]
            results.append(rec)
            print(json.dumps(rec), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(results, indent=1))
    keys = ["AP", "AP50", "AP75", "AP50_agnostic", "class_acc_found", "blank_AP50", "blank_AP50_agnostic", "shuffled_AP50",
            "shuffled_AP50_agnostic"]
    print(f"\nval: {len(val.gt['images'])} images, {len(val.gt['annotations'])} objects; controls: {a.controls} "
          "images each\n")
    print("| row | runs | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for name in rows:
        rs = [r for r in results if r["row"] == name]

        def cell(k):
            v = [r[k] for r in rs]
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        print(f"| {name} | {len(rs)} | " + " | ".join(cell(k) for k in keys) + " |")


if __name__ == "__main__":
    main()
