"""``maskconv visualize recon | curves | collapse | erf``: pictures of what a model learned, and the images and
rebuilt models they are drawn from (``sample_images``, ``load_backbone``)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..commands import Command
from ..engine.rundir import RunDir


def run_visualize_recon(checkpoint: str | Path, images: str | Path, out: str | Path, size: int | None = None,
                        mask_ratio: float | None = None, seed: int = 0, limit: int = 8) -> Path:
    """Reconstruction PNG from a pretraining run folder or its ``objective.safetensors`` on images from a file,
    a folder or a named dataset, decoded and resized as training's evaluation does: rows of original | masked |
    prediction | prediction + visible. ``size`` defaults to the run's ``data.img_size``."""
    from ..data import default_norm
    from ..pretrain import load_objective
    from ..rebuild import read_run_config
    from ..viz.reconstruction import plot_reconstruction

    path, run = Path(checkpoint), None
    if path.is_dir():
        run, path = path, path / RunDir.OBJECTIVE
        if not path.is_file():
            raise FileNotFoundError(f"{run} has no {RunDir.OBJECTIVE} (not a finished pretraining run?)")
    elif (path.parent / RunDir.CONFIG).is_file():
        run = path.parent
    obj = load_objective(path, **({} if mask_ratio is None else {"mask_ratio": mask_ratio}))
    p = obj.patch_size
    if size is None:
        size = read_run_config(run)[0].data.img_size if run is not None else max(p, 224 // p * p)
    if size % p:
        raise ValueError(f"--size {size} must be a multiple of the patch size {p}")
    x = sample_images(str(images), size, obj.in_chans, limit)  # a file, a folder or a named dataset
    mean, std = default_norm(obj.in_chans)
    mask = obj.make_mask(x, generator=torch.Generator().manual_seed(seed))
    path = plot_reconstruction(obj, x, out, mean, std, mask=mask)
    print(f"wrote {Path(path).resolve()}")
    return path


def load_backbone(source: str | Path | None, model: str | None = None, **model_kwargs):
    """An encoder (``num_classes=0``) from a run folder or a weights file, rebuilt as trained (stem stride,
    channels from the run's config), as a ``rebuild.Trained`` (``.model``, ``.config``); ``model`` names it
    when the file has no run config; random init when ``source`` is None or 'none'."""
    from ..rebuild import load_trained

    source = None if source in (None, "", "none") else source
    if source is None and model is None:
        raise ValueError("name the architecture with --model for a random-init model")
    return load_trained(source, model, encoder=True, **{k: v for k, v in model_kwargs.items() if v is not None})


def sample_images(source: str, size: int, in_chans: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images from a named dataset (test split) or a file/folder, decoded by training's decoder
    (``decode_image``: 16-bit, CMYK, alpha ...) and eval-transformed at ``size`` as training validates."""
    from ..config import DataCfg
    from ..data.build import NAMED, build_dataset, build_transform
    from ..data.datasets import ImageFolderDataset, decode_image

    cfg = DataCfg(path=source, img_size=size)
    tf = build_transform(cfg, in_chans, train=False)
    if source in NAMED:
        ds = build_dataset(cfg, in_chans, "train" if source == "photos" else "val", labeled=source != "photos")
        return torch.stack([tf(ds[i][0]) for i in range(min(limit, len(ds)))])
    src = Path(source)
    if src.is_dir():
        ds = ImageFolderDataset(src, in_chans)
        files = [f for f, _ in ds.samples]
    elif src.is_file():
        files = [src]
    else:
        raise FileNotFoundError(f"no such image file or folder: {src} (or a named dataset: {', '.join(NAMED)})")
    out, bad = [], []
    for f in files:
        if len(out) == limit:
            break
        try:
            out.append(tf(decode_image(f, in_chans)))
        except Exception:  # an undecodable file: skipped, named below
            bad.append(f.name)
    if bad:
        print(f"skipped {len(bad)} undecodable file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if not out:
        raise ValueError(f"no readable image in {src}")
    return torch.stack(out)


def run_visualize_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Loss / lr / accuracy PNG of a run folder's ``metrics.jsonl`` (default ``out``: beside it)."""
    from ..viz.curves import plot_curves

    path = plot_curves(run, out)
    print(f"wrote {path}")
    return path


def run_visualize_collapse(checkpoints: list[str | None], images: str, out: str | Path, model: str | None = None,
                           where: str = "block", limit: int = 256, size: int | None = None,
                           in_chans: int | None = None, stem_stride: int | None = None) -> dict:
    """Feature-collapse numbers (JSON) and plot (PNG) for one or more ConvNeXt checkpoints (run folders, weights
    files, or None / 'none' for a random-init ``model``) on the same images."""
    import json

    from ..viz.collapse import feature_collapse, plot_collapse

    results = {}
    checkpoints = [None if c in (None, "", "none") else c for c in (checkpoints or [None])]
    for src in checkpoints:
        trained = load_backbone(src, model, in_chans=in_chans, stem_stride=stem_stride)
        net = trained.model
        s = size or (trained.config.data.img_size if trained.config else 32 if net.stride <= 8 else 224)
        x = sample_images(images, s, net.in_chans, limit)
        label = Path(src).name if src else f"{net.pretrained_cfg['architecture']} (random init)"
        if label in results:  # two runs with the same folder name: keep both
            label = f"{label} ({src})"
        results[label] = feature_collapse(net, x, where)
        mean = sum(r["distance"] for r in results[label]) / len(results[label])
        print(f"{label}: mean distance {mean:.4f} over {len(results[label])} blocks ({len(x)} images, {where})")
    out = Path(out)
    plot_collapse(results, out, title=f"feature collapse ({where} activations, {images})")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return results


def run_visualize_erf(models: list[str], checkpoints: list[str | None] | None, images: str, out: str | Path,
                      size: int = 256, num_images: int = 8, batch_size: int = 4) -> dict:
    """Effective receptive fields (RepLKNet/SLaK method) of one or more models on the same images: a PNG of the
    heat maps side by side and the high-contribution area ratios as JSON beside it. ``checkpoints[i]`` (a run
    folder, a weights file, or None / 'none' for random init) goes with ``models[i]``."""
    import json

    from ..viz.erf import erf_map, high_contribution_area, plot_erf

    if not models:
        raise ValueError("name at least one model (--model)")
    checkpoints = [None if c in (None, "", "none") else c for c in (checkpoints or [None] * len(models))]
    if len(checkpoints) != len(models):
        raise ValueError(f"{len(checkpoints)} checkpoints for {len(models)} models: give one --checkpoint per "
                         "--model (use 'none' for random init)")
    if num_images < 1 or size < 1:
        raise ValueError(f"--num-images ({num_images}) and --size ({size}) must be >= 1")
    maps, results = {}, {}
    for name, src in zip(models, checkpoints):
        net = load_backbone(src, name).model  # a run's own stem stride and channels
        label = f"{name} ({Path(src).name})" if src else f"{name} (random init)"
        if label in maps:
            label = f"{label} #{len(maps)}"
        x = sample_images(images, size, net.in_chans, num_images)
        t0 = time.perf_counter()
        maps[label] = erf_map(net, x, batch_size)
        ratios = high_contribution_area(maps[label])
        results[label] = dict(model=name, checkpoint=None if src is None else str(src), images=len(x), size=size,
                              ratios=ratios)
        text = ", ".join(f"t={r['t']:g}: side {r['side']} area {r['area_ratio']:.4f}" for r in ratios)
        print(f"{label}: {text} ({len(x)} images, {time.perf_counter() - t0:.1f} s)")
    out = Path(out)
    init = "random-init weights" if all(c is None for c in checkpoints) else "trained weights" if all(
        checkpoints) else "weights as labelled"
    plot_erf(maps, out, {k: v["ratios"] for k, v in results.items()},
             title=f"effective receptive field, {init} ({len(x)} images from {images}, {size}px; "
                   "% = area holding t of the log-ERF)")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return results


def _arguments(v) -> None:
    import argparse

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


def _cli(args) -> None:
    if args.what == "recon":
        run_visualize_recon(args.checkpoint, args.images, args.out, args.size, args.mask_ratio, args.seed, args.limit)
    elif args.what == "curves":
        run_visualize_curves(args.run, args.out)
    elif args.what == "collapse":
        run_visualize_collapse(args.checkpoint or [None], args.images, args.out, args.model, args.where,
                               args.limit, args.size, args.in_chans, args.stem_stride)
    else:
        run_visualize_erf(args.model, args.checkpoint, args.images, args.out, args.size, args.num_images)


COMMAND = Command("pictures of what a model learned", _arguments, _cli)
