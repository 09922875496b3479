"""``maskconv export``: an ONNX / torch.export file of a trained model, checked against PyTorch, with its
preprocessing written beside it."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..commands import Command


def run_export(checkpoint: str | Path | None, out: str | Path, format: str = "onnx", model: str | None = None,
               img_size: int | tuple[int, int] | None = None, reparam: bool = False, num_classes: int | None = None,
               dynamic_batch: bool = True, random_weights: bool = False, weights: str = "raw"):
    """Write the model of ``checkpoint`` (a run folder, or any weights file; the run's config rebuilds the exact
    model: stem stride, channels, classes, pooling) as ONNX or a torch.export .pt2 file, check the reloaded file
    against PyTorch, and write the preprocessing it expects beside it (``<name>.preprocessing.json``: size,
    resize/crop, mean, std, channels). ``checkpoint=None`` exports random weights only with
    ``random_weights=True`` (then ``model`` names the architecture). ``img_size`` defaults to the run's
    ``data.img_size`` (224 without a run config); ``weights``: raw | ema for a run folder."""
    from ..config import DataCfg
    from ..export import FORMATS, export_model
    from ..export.preprocess import preprocessing_spec, write_preprocessing
    from ..rebuild import load_trained

    if format not in FORMATS:  # before loading or building anything
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if checkpoint is None and not random_weights:
        raise ValueError("no --checkpoint: give a run folder or a weights file (or --random-weights to export an "
                         "untrained model on purpose)")
    if checkpoint is None and model is None:
        raise ValueError("--random-weights needs --model to name the architecture")
    trained = load_trained(checkpoint, model, num_classes=num_classes, weights=weights)
    net, cfg = trained.model, trained.config
    if img_size is None:
        img_size = cfg.data.img_size if cfg is not None else 224
    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size[0], img_size[-1])
    if cfg is not None and (h, w) != (cfg.data.img_size,) * 2:
        print(f"note: tracing at {h}x{w} px; the model was trained and validated at {cfg.data.img_size} px")
    report = export_model(net, out, format, img_size, reparam=reparam, dynamic_batch=dynamic_batch)
    data = dataclasses.replace(cfg.data if cfg is not None else DataCfg(), img_size=h)
    spec = preprocessing_spec(data, getattr(net, "in_chans", 3), (h, w))
    spec["model"] = trained.name
    spec["weights"] = str(trained.weights) if trained.weights is not None else "random init"
    if cfg is None:
        spec["note"] = "no run config next to the weights: maskconv's default eval preprocessing at this size"
    pre = write_preprocessing(spec, out)
    print(report)
    print(f"preprocessing: {pre}")
    return report


def _arguments(x) -> None:
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


def _cli(args) -> int | None:
    if args.img_size is not None and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
    try:
        run_export(args.checkpoint, args.out, args.format, args.model,
                   None if args.img_size is None else tuple(args.img_size), args.reparam,
                   args.num_classes, dynamic_batch=not args.static_batch,
                   random_weights=args.random_weights, weights=args.weights)
    except RuntimeError as e:  # the reloaded file does not match PyTorch
        print(f"maskconv: export failed: {e}", file=sys.stderr)
        return 1
    return None


COMMAND = Command("ONNX / torch.export file of a trained model, checked against PyTorch, with its preprocessing "
                  "written beside it", _arguments, _cli)
