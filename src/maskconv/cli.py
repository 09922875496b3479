"""Command line: ``maskconv <command>`` / ``python -m maskconv`` / ``torchrun -m maskconv``.

Parses arguments and calls ``maskconv.api``; nothing else happens here. Training flags are generated from
the config dataclasses (``--optim.blr 1e-4`` or ``optim.blr=1e-4``); precedence: defaults < --recipe <
flags and key=value overrides.
"""
from __future__ import annotations

import argparse
import sys

# Short flags for the keys every run sets.
ALIASES = {"--model": "model.name", "--data": "data.path", "--out": "run.out", "--init": "model.init",
           "--objective": "objective.name"}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from .config import flat_keys

    p.add_argument("--recipe", help="YAML recipe: a file or a packaged name (see src/maskconv/recipes)")
    for flag, key in ALIASES.items():
        p.add_argument(flag, dest=key, default=None, help=f"= {key}")
    for key, (tp, default) in flat_keys().items():
        if key in ALIASES.values() or key == "task":
            continue
        p.add_argument(f"--{key}", dest=key, default=None, metavar="V",
                       help=f"{getattr(tp, '__name__', str(tp))}, default {default!r}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=5")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskconv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list registered models with params and GMACs")
    m.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'convnextv2_*'")
    m.add_argument("--img-size", type=int, default=224)
    m.add_argument("--throughput", action="store_true", help="also measure CPU inference img/s (<=30M params)")
    for task, text in (("pretrain", "masked-image pretraining on unlabeled images"),
                       ("finetune", "supervised fine-tuning (class sub-folders or a named dataset)"),
                       ("linprobe", "linear probe on a frozen backbone")):
        _add_config_flags(sub.add_parser(task, help=text))
    e = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix of a run")
    e.add_argument("--checkpoint", required=True, help="a finetune/linprobe run folder or its last.pt")
    e.add_argument("--data", default=None, help="dataset (default: the run's own validation data)")
    e.add_argument("--out", default=None)
    e.add_argument("--batch-size", type=int, default=64)
    v = sub.add_parser("visualize", help="pictures of what a model learned")
    vsub = v.add_subparsers(dest="what", required=True)
    r = vsub.add_parser("recon", help="masked reconstructions from a pretraining checkpoint")
    r.add_argument("--checkpoint", required=True, help="objective.safetensors of a pretraining run")
    r.add_argument("--images", required=True, help="an image file, a folder, or fashion-mnist | photos | synthetic")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--size", type=int, default=None, help="crop size (multiple of the patch size)")
    r.add_argument("--mask-ratio", type=float, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=8, help="at most this many images")
    c = vsub.add_parser("curves", help="loss / lr / accuracy PNG from a run's metrics.jsonl")
    c.add_argument("run")
    c.add_argument("--out", default=None)
    k = vsub.add_parser("collapse", help="feature-collapse analysis (ConvNeXt V2 paper) of one or more models")
    k.add_argument("--checkpoint", action="append", default=None,
                   help="run folder or weights file; repeat to compare models (none: random init)")
    k.add_argument("--model", default=None, help="architecture, when --checkpoint is a weights file")
    k.add_argument("--images", required=True, help="image file/folder, or fashion-mnist | photos | synthetic")
    k.add_argument("--out", required=True, help="PNG to write (numbers go beside it as .json)")
    k.add_argument("--where", choices=("block", "mlp"), default="block")
    k.add_argument("--limit", type=int, default=256)
    k.add_argument("--size", type=int, default=None)
    k.add_argument("--in-chans", type=int, default=None)
    k.add_argument("--patch-size", type=int, default=None)
    f = vsub.add_parser("erf", help="effective receptive field (RepLKNet/SLaK method) of one or more models")
    f.add_argument("--model", action="append", required=True, help="architecture; repeat to compare models")
    f.add_argument("--checkpoint", action="append", default=None,
                   help="run folder or weights file per --model, in order ('none': random init; omit: all random)")
    f.add_argument("--images", required=True, help="image file/folder, or photos | fashion-mnist | synthetic")
    f.add_argument("--out", required=True, help="PNG to write (ratios go beside it as .json)")
    f.add_argument("--size", type=int, default=256, help="square input size (a multiple of the model's stride)")
    f.add_argument("--num-images", type=int, default=8)
    x = sub.add_parser("export", help="ONNX / torch.export file of a model, checked against PyTorch")
    x.add_argument("--model", required=True)
    x.add_argument("--checkpoint", default=None, help="weights file (any layout maskconv.load_checkpoint reads)")
    x.add_argument("--format", required=True, help="onnx | torch-export")
    x.add_argument("--out", required=True, help="file to write (.onnx / .pt2)")
    x.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="S", help="H [W] of the traced input")
    x.add_argument("--reparam", action="store_true", help="merge re-parameterizable branches before exporting")
    x.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's classifier size")
    x.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 (default: dynamic)")
    s = sub.add_parser("scenes", help="write the offline detection benchmark: Fashion-MNIST scenes as COCO JSON")
    s.add_argument("--out", required=True, help="folder for annotations.json + images/ (reused when it exists)")
    s.add_argument("--split", choices=("train", "val"), default="train", help="train or t10k Fashion-MNIST items")
    s.add_argument("--num", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=128, help="canvas side in px")
    px = sub.add_parser("pix2seq", help="Pix2Seq object detection on any backbone (COCO-format data)")
    psub = px.add_subparsers(dest="what", required=True)
    _add_pix2seq_train(psub.add_parser("train", help="train on a COCO folder / JSON (--data), any --backbone"))
    pe = psub.add_parser("eval", help="COCO AP / AP50 / AP75 of a run, predictions in COCO results format")
    pe.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pe.add_argument("--data", required=True, help="COCO folder (annotations.json + images) or JSON file")
    pe.add_argument("--out", default=None)
    pe.add_argument("--batch-size", type=int, default=16)
    pp = psub.add_parser("predict", help="detect objects in images; JSON and an optional picture")
    pp.add_argument("--checkpoint", required=True, help="a pix2seq run folder")
    pp.add_argument("--images", required=True, help="an image file or a folder")
    pp.add_argument("--out", required=True, help="JSON to write")
    pp.add_argument("--draw", default=None, help="PNG of the images with boxes, classes and scores")
    pp.add_argument("--threshold", type=float, default=0.3, help="lowest score kept")
    d = sub.add_parser("demo", help="the main job on the embedded data: zoo table + short FCMAE pretraining")
    d.add_argument("--out", default="demo_out")
    return p


def _add_pix2seq_train(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from .pix2seq.task import Pix2SeqOptions

    _add_config_flags(p)
    p.add_argument("--backbone", dest="model.name", default=None, help="= model.name (any maskconv backbone)")
    p.add_argument("--val", default=None, help="COCO data scored (AP) after each evaluated epoch")
    for f in fields(Pix2SeqOptions):
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes")}.get(f.type, None) or \
            {"int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"p2s_{f.name}", type=kind, default=None,
                       metavar="V", help=f"pix2seq, default {f.default!r}")


def config_from_args(args) -> "Config":  # noqa: F821
    from .config import load_config, set_key  # noqa: F401

    from .config import ConfigError, validate

    cfg = load_config(args.recipe, args.overrides)
    if args.recipe and args.command in ("pretrain", "finetune", "linprobe") and cfg.task != args.command:
        raise ConfigError(f"recipe {args.recipe!r} is a {cfg.task} recipe; run it with `maskconv {cfg.task}`")
    for key, value in vars(args).items():
        if "." in key and value is not None:
            set_key(cfg, key, value)
    if args.command in ("pretrain", "finetune", "linprobe"):
        cfg.task = args.command
    return validate(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # key=value overrides may stand anywhere among the flags: argparse takes one positional run, so collect
    # the rest from the unknown arguments (anything else unknown is still an error).
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from . import api
    from .config import ConfigError

    clean = False  # every rank got to the end without an error: safe to meet at a barrier before teardown
    try:
        if args.command == "models":
            rows = api.model_table(args.pattern, args.img_size,
                                   throughput_max_params_m=30.0 if args.throughput else 0.0)
            if not rows:
                print(f"no model matches {args.pattern!r}", file=sys.stderr)
                return 2
            print(api.format_table(rows, args.img_size))
        elif args.command in ("pretrain", "finetune", "linprobe"):
            cfg = config_from_args(args)
            getattr(api, f"run_{args.command}")(cfg)
        elif args.command == "eval":
            api.run_eval(args.checkpoint, args.data, args.out, args.batch_size)
        elif args.command == "visualize" and args.what == "recon":
            api.run_visualize_recon(args.checkpoint, args.images, args.out, args.size, args.mask_ratio,
                                    args.seed, args.limit)
        elif args.command == "visualize" and args.what == "curves":
            from .viz.curves import plot_curves

            print(f"wrote {plot_curves(args.run, args.out)}")
        elif args.command == "visualize" and args.what == "collapse":
            api.run_visualize_collapse(args.checkpoint or [None], args.images, args.out, args.model, args.where,
                                       args.limit, args.size, args.in_chans, args.patch_size)
        elif args.command == "visualize" and args.what == "erf":
            api.run_visualize_erf(args.model, args.checkpoint, args.images, args.out, args.size, args.num_images)
        elif args.command == "export":
            if len(args.img_size) > 2:
                raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
            try:
                api.run_export(args.model, args.out, args.format, args.checkpoint, tuple(args.img_size), args.reparam,
                               args.num_classes, dynamic_batch=not args.static_batch)
            except RuntimeError as e:  # the reloaded file does not match PyTorch
                print(f"maskconv: export failed: {e}", file=sys.stderr)
                return 1
        elif args.command == "pix2seq":
            from .pix2seq import task as p2s

            if args.what == "train":
                opts = p2s.Pix2SeqOptions(**{k[4:]: v for k, v in vars(args).items() if k.startswith("p2s_") and
                                             v is not None})
                p2s.run_pix2seq_train(config_from_args(args), opts, args.val)
            elif args.what == "eval":
                p2s.run_pix2seq_eval(args.checkpoint, args.data, args.out, args.batch_size)
            else:
                p2s.run_pix2seq_predict(args.checkpoint, args.images, args.out, args.draw, args.threshold)
        elif args.command == "scenes":
            from .data.scenes import make_scenes

            print(f"scenes: {make_scenes(args.out, args.split, args.num, args.seed, args.size)}")
        elif args.command == "demo":
            api.run_demo(args.out)
        clean = True
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:  # one line, no traceback
        print(f"maskconv: error: {e}", file=sys.stderr)
        return 2
    finally:
        from .engine.dist import teardown

        teardown(clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
