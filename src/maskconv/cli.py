"""Command line: ``maskconv <command>`` / ``python -m maskconv`` / ``torchrun -m maskconv``.

Parses arguments and calls ``maskconv.api``; nothing else happens here. Training flags are generated from
the config dataclasses (``--optim.blr 1e-4`` or ``optim.blr=1e-4``); precedence: defaults < --recipe <
flags and key=value overrides; one key given both as a flag and as key=value is an error.
"""
from __future__ import annotations

import argparse
import sys

# Short flags for the keys every run sets.
ALIASES = {"--model": "model.name", "--data": "data.path", "--out": "run.out", "--init": "model.init",
           "--objective": "objective.name"}
TASKS = {"pretrain": "masked-image pretraining (FCMAE / MAE / ConvMAE) on unlabeled images",
         "finetune": "supervised fine-tuning (class sub-folders or a named dataset)",
         "linprobe": "linear probe: a BatchNorm + linear classifier on a frozen backbone"}
# Config keys a task never reads (a section name = all its keys); a new key is listed for every task until named
# here. Pretraining has no labels or classifier; linear probing trains only the probe on eval-style crops.
UNUSED = {
    "pretrain": ("model.global_pool", "model.head_init_scale", "data.labels_per_class", "data.rand_augment",
                 "data.reprob", "data.mixup", "data.cutmix", "data.label_smoothing", "optim.layer_decay",
                 "optim.layer_decay_scheme"),
    "finetune": ("objective",),
    "linprobe": ("objective", "sparse", "model.drop_path_rate", "model.head_init_scale", "data.crop_scale_min",
                 "data.hflip", "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix", "optim.layer_decay",
                 "optim.layer_decay_scheme"),
    "pix2seq": ("objective", "model.global_pool", "model.head_init_scale", "data.labels_per_class", "data.val_fraction",
                "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix", "data.label_smoothing"),
}


def field_docs() -> dict[str, str]:
    """``{'optim.blr': 'base lr for an effective batch of 256', ...}`` from the comments in config.py: a field's
    own end-of-line comment, else the comment line(s) right above it; a field without either has no entry."""
    import inspect
    import io
    import tokenize

    from . import config

    src = inspect.getsource(config)
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    sections = {f.name: type(f.default_factory()).__name__ for f in config.dataclasses.fields(config.Config)
                if f.default_factory is not config.dataclasses.MISSING}
    docs, cls = {}, None
    for i, line in enumerate(lines, start=1):
        if line.startswith("class "):
            cls = line[len("class "):].split("(")[0].split(":")[0]
            continue
        if cls is None or not line.startswith("    ") or ":" not in line or line.strip().startswith(("#", '"')):
            continue
        name = line.strip().split(":")[0]
        if not name.isidentifier():
            continue
        text = comments.get(i)
        j = i - 1
        while text is None and j in comments and lines[j - 1].strip().startswith("#"):  # a block above the field
            text = comments[j]
            j -= 1
        section = next((k for k, v in sections.items() if v == cls), None)
        if text and section:
            docs[f"{section}.{name}"] = text
    return docs


def task_keys(task: str) -> list[str]:
    """The config keys ``task`` reads (every key but those listed in ``UNUSED[task]``)."""
    from .config import flat_keys

    skip = UNUSED.get(task, ())
    return [k for k in flat_keys() if k != "task" and k not in skip and k.split(".")[0] not in skip]


def recipe_names(task: str | None = None) -> list[str]:
    """Packaged recipe names (``task``: only the recipes of that task)."""
    from pathlib import Path

    import yaml

    out = []
    for f in sorted((Path(__file__).parent / "recipes").glob("*.yaml")):
        if task is None or (yaml.safe_load(f.read_text()) or {}).get("task", "pretrain") == task:
            out.append(f.stem)
    return out


def _add_config_flags(p: argparse.ArgumentParser, task: str) -> None:
    from .config import flat_keys

    docs, types = field_docs(), flat_keys()
    names = ", ".join(recipe_names(task)) or "none packaged yet"
    p.add_argument("--recipe", help=f"YAML recipe: a file, or a packaged {task} recipe ({names})")
    for flag, key in ALIASES.items():
        if key in task_keys(task):
            p.add_argument(flag, dest=key, default=None, help=f"{docs.get(key, key)} (= --{key})")
    groups = {}
    for key in task_keys(task):
        if key in ALIASES.values():
            continue
        section = key.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section}.* options")
        tp, default = types[key]
        kind = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        desc = docs.get(key)
        groups[section].add_argument(f"--{key}", dest=key, default=None, metavar="V",
                                     help=f"{desc + '. ' if desc else ''}{kind}, default {default!r}")
    from .config import RENAMED

    for old in RENAMED:  # still accepted (set_key says it is renamed), not shown
        p.add_argument(f"--{old}", dest=old, default=None, help=argparse.SUPPRESS)
    p.add_argument("--allow-config-change", action="store_true", default=None, dest="run.allow_config_change",
                   help="resume a run with other training settings, recording the change and its step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=5")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskconv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list registered models with params and GMACs")
    m.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'convnextv2_*'")
    m.add_argument("--img-size", type=int, default=224)
    m.add_argument("--throughput", action="store_true", help="also measure CPU inference img/s (<=30M params)")
    for task, text in TASKS.items():
        _add_config_flags(sub.add_parser(task, help=text, description=f"{text}. Options not listed here are not read "
                                         f"by {task}."), task)
    e = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix of a run")
    e.add_argument("--checkpoint", required=True,
                   help="a finetune/linprobe run folder, its last.pt, or a weights file (model[_ema].safetensors)")
    e.add_argument("--weights", choices=("both", "raw", "ema"), default="both",
                   help="score the trained (raw) weights, their EMA, or both (default)")
    e.add_argument("--data", default=None, help="labeled dataset (default: the run's own validation data)")
    e.add_argument("--out", default=None, help="output folder (default: <run>/eval/<split> or eval/<data>-<split>)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--model", default=None, help="architecture, when the weights file has no config.json beside it")
    e.add_argument("--img-size", type=int, default=None, help="default: the run's data.img_size")
    e.add_argument("--in-chans", type=int, default=None, help="default: the run's model.in_chans")
    e.add_argument("--stem-stride", type=int, default=None, help="default: the run's model.stem_stride")
    e.add_argument("--patch-size", dest="stem_stride", type=int, help=argparse.SUPPRESS)  # the old name
    v = sub.add_parser("visualize", help="pictures of what a model learned")
    vsub = v.add_subparsers(dest="what", required=True)
    r = vsub.add_parser("recon", help="masked reconstructions from a pretraining checkpoint")
    r.add_argument("--checkpoint", required=True, help="a pretraining run folder or its objective.safetensors")
    r.add_argument("--images", required=True, help="an image file, a folder, or fashion-mnist | photos | synthetic")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--size", type=int, default=None,
                   help="crop size, a multiple of the patch size (default: the run's data.img_size)")
    r.add_argument("--mask-ratio", type=float, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=8, help="at most this many images")
    c = vsub.add_parser("curves", help="loss / lr / accuracy PNG from a run's metrics.jsonl")
    c.add_argument("run")
    c.add_argument("--out", default=None)
    k = vsub.add_parser("collapse", help="feature-collapse analysis (ConvNeXt V2 paper) of one or more models")
    k.add_argument("--checkpoint", action="append", default=None,
                   help="run folder or weights file; repeat to compare models ('none': random init of --model)")
    k.add_argument("--model", default=None, help="architecture, when --checkpoint is a weights file")
    k.add_argument("--images", required=True, help="image file/folder, or fashion-mnist | photos | synthetic")
    k.add_argument("--out", required=True, help="PNG to write (numbers go beside it as .json)")
    k.add_argument("--where", choices=("block", "mlp"), default="block")
    k.add_argument("--limit", type=int, default=256)
    k.add_argument("--size", type=int, default=None, help="default: the run's data.img_size")
    k.add_argument("--in-chans", type=int, default=None, help="default: the run's model.in_chans")
    k.add_argument("--stem-stride", type=int, default=None, help="default: the run's model.stem_stride")
    k.add_argument("--patch-size", dest="stem_stride", type=int, help=argparse.SUPPRESS)  # the old name
    f = vsub.add_parser("erf", help="effective receptive field (RepLKNet/SLaK method) of one or more models")
    f.add_argument("--model", action="append", required=True, help="architecture; repeat to compare models")
    f.add_argument("--checkpoint", action="append", default=None,
                   help="run folder or weights file per --model, in order ('none': random init; omit: all random)")
    f.add_argument("--images", required=True, help="image file/folder, or photos | fashion-mnist | synthetic")
    f.add_argument("--out", required=True, help="PNG to write (ratios go beside it as .json)")
    f.add_argument("--size", type=int, default=256, help="square input size (a multiple of the model's stride)")
    f.add_argument("--num-images", type=int, default=8)
    x = sub.add_parser("export", help="ONNX / torch.export file of a trained model, checked against PyTorch, with "
                                      "its preprocessing written beside it")
    x.add_argument("--checkpoint", default=None,
                   help="a run folder, or a weights file (any layout maskconv.load_checkpoint reads); the run's "
                        "config.json rebuilds the exact model (stem stride, channels, classes)")
    x.add_argument("--model", default=None, help="architecture, when the weights file is not in a run folder")
    x.add_argument("--weights", choices=("raw", "ema"), default="raw", help="which weights of a run folder")
    x.add_argument("--random-weights", action="store_true", help="export --model untrained (no --checkpoint)")
    x.add_argument("--format", required=True, help="onnx | torch-export")
    x.add_argument("--out", required=True, help="file to write (.onnx / .pt2); NAME.preprocessing.json goes beside it")
    x.add_argument("--img-size", type=int, nargs="+", default=None, metavar="S",
                   help="H [W] of the traced input (default: the run's data.img_size, else 224)")
    x.add_argument("--reparam", action="store_true", help="merge re-parameterizable branches before exporting")
    x.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's classifier size")
    x.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 (default: dynamic)")
    rm = sub.add_parser("roadmap", help="ConvNeXt paper's ResNet-50 -> ConvNeXt-T steps: params, GMACs, paper figures")
    rm.add_argument("--out", default="roadmap.png", help="PNG of the paper's Figure-2 chart to write")
    rm.add_argument("--img-size", type=int, default=224)
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

    _add_config_flags(p, "pix2seq")
    p.add_argument("--backbone", dest="model.name", default=None, help="= model.name (any maskconv backbone)")
    p.add_argument("--val", default=None, help="COCO data scored (AP) after each evaluated epoch")
    for f in fields(Pix2SeqOptions):
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes")}.get(f.type, None) or \
            {"int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"p2s_{f.name}", type=kind, default=None,
                       metavar="V", help=f"pix2seq, default {f.default!r}")


def config_from_args(args) -> "Config":  # noqa: F821
    from .config import load_config, set_key  # noqa: F401

    from .config import ConfigError, split_override, validate

    cfg = load_config(args.recipe, args.overrides)
    if args.recipe and args.command in ("pretrain", "finetune", "linprobe") and cfg.task != args.command:
        raise ConfigError(f"recipe {args.recipe!r} is a {cfg.task} recipe; run it with `maskconv {cfg.task}`")
    given = {split_override(o)[0] for o in args.overrides}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            if key in given:  # which one wins would depend on argparse internals: say so instead
                flag = next((f for f, k in ALIASES.items() if k == key), f"--{key}")
                raise ConfigError(f"{key} is given twice ({flag} {value} and {key}=...): give it once")
            set_key(cfg, key, value)
    if args.command in ("pretrain", "finetune", "linprobe"):
        cfg.task = args.command
    return validate(cfg)


def error_line(e: BaseException) -> str:
    """One line for a user-level error. An exception re-raised from a DataLoader worker carries the worker's
    whole traceback in its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ...");
    keep only what the original exception said."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = f"{type(e).__name__}: "
        return (last[len(name):] if last.startswith(name) else last) + " (in a data loader worker)"
    return text


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
    from .engine.loop import Interrupted

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
            api.run_eval(args.checkpoint, args.data, args.out, args.batch_size, weights=args.weights, model=args.model,
                         img_size=args.img_size, in_chans=args.in_chans, stem_stride=args.stem_stride)
        elif args.command == "visualize" and args.what == "recon":
            api.run_visualize_recon(args.checkpoint, args.images, args.out, args.size, args.mask_ratio,
                                    args.seed, args.limit)
        elif args.command == "visualize" and args.what == "curves":
            from .viz.curves import plot_curves

            print(f"wrote {plot_curves(args.run, args.out)}")
        elif args.command == "visualize" and args.what == "collapse":
            api.run_visualize_collapse(args.checkpoint or [None], args.images, args.out, args.model, args.where,
                                       args.limit, args.size, args.in_chans, args.stem_stride)
        elif args.command == "visualize" and args.what == "erf":
            api.run_visualize_erf(args.model, args.checkpoint, args.images, args.out, args.size, args.num_images)
        elif args.command == "export":
            if args.img_size is not None and len(args.img_size) > 2:
                raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
            try:
                api.run_export(args.checkpoint, args.out, args.format, args.model,
                               None if args.img_size is None else tuple(args.img_size), args.reparam,
                               args.num_classes, dynamic_batch=not args.static_batch,
                               random_weights=args.random_weights, weights=args.weights)
            except RuntimeError as e:  # the reloaded file does not match PyTorch
                print(f"maskconv: export failed: {e}", file=sys.stderr)
                return 1
        elif args.command == "roadmap":
            from .viz.roadmap import write_roadmap

            print(write_roadmap(args.out, args.img_size))
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
    except Interrupted as e:  # Ctrl-C / SIGTERM: a checkpoint was saved
        print(f"maskconv: {e}", file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:
        if "Timed out" not in str(e):  # a collective gave up on a stopped / hung process (run.dist_timeout_minutes)
            raise
        print(f"maskconv: error: another process did not answer within run.dist_timeout_minutes ({e})",
              file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:  # one line, no traceback
        print(f"maskconv: error: {error_line(e)}", file=sys.stderr)
        return 2
    finally:
        from .engine.dist import teardown

        teardown(clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
