"""Everything the CLI does, as importable functions (the CLI only parses arguments and calls these)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .models import create_model, list_models
from .train import evaluate_classifier, run_eval, run_finetune, run_linprobe, run_pretrain  # noqa: F401


@dataclass
class ModelRow:
    name: str
    params_m: float  # millions, with the default 1000-class head
    gmacs: float  # multiply-accumulates / 1e9 at img_size (what the ConvNeXt papers call "FLOPs")
    img_per_s: float | None  # measured inference throughput on this machine, None if skipped


def count_macs(model: torch.nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> float:
    """Multiply-accumulates of one forward pass for a single image (conv + matmul, via FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, in_chans, h, w, device=device))
    return counter.get_total_flops() / 2  # FlopCounterMode counts a MAC as 2 FLOPs


def measure_throughput(model: torch.nn.Module, img_size: int = 224, batch: int = 8, seconds: float = 1.0) -> float:
    """Images per second of ``model.eval()`` inference on CPU, after one warm-up batch."""
    model.eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            model(x)
            n += 1
        return n * batch / (time.perf_counter() - t0)


def model_table(pattern: str = "*", img_size: int = 224, throughput_max_params_m: float = 30.0,
                progress: bool = True) -> list[ModelRow]:
    """Params and GMACs at ``img_size`` of every registered model matching ``pattern`` (built on the meta
    device: no memory, no time), plus measured CPU throughput for models up to ``throughput_max_params_m``."""
    from tqdm import tqdm

    rows = []
    names = list_models(pattern, exclude_test=True)
    if not names:  # nothing to measure: no (empty) progress bar either
        return rows
    for name in tqdm(names, desc="models", disable=not progress):
        with torch.device("meta"):
            meta = create_model(name)
        params = sum(p.numel() for p in meta.parameters()) / 1e6
        macs = count_macs(meta, img_size) / 1e9
        ips = None
        if params <= throughput_max_params_m:
            ips = measure_throughput(create_model(name), img_size)
        rows.append(ModelRow(name, round(params, 2), round(macs, 2), None if ips is None else round(ips, 1)))
    return sorted(rows, key=lambda r: (r.name.split("_")[0], r.params_m))  # family, then size


def machine_description() -> str:
    """'N CPU cores, T threads, load average L' (load on the machine when measuring; throughput depends on it)."""
    import os

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads{load}"


def format_table(rows: list[ModelRow], img_size: int = 224) -> str:
    lines = [f"| model | params (M) | GMACs @{img_size} | CPU img/s @{img_size} |", "|---|---:|---:|---:|"]
    for r in rows:
        ips = "—" if r.img_per_s is None else f"{r.img_per_s:.1f}"
        lines.append(f"| {r.name} | {r.params_m:.2f} | {r.gmacs:.2f} | {ips} |")
    return "\n".join(lines)


def run_visualize_recon(checkpoint: str | Path, images: str | Path, out: str | Path, size: int | None = None,
                        mask_ratio: float | None = None, seed: int = 0, limit: int = 8) -> Path:
    """Reconstruction PNG from a pretraining run folder or its ``objective.safetensors`` on images from a file,
    a folder or a named dataset, decoded and resized as training's evaluation does: rows of original | masked |
    prediction | prediction + visible. ``size`` defaults to the run's ``data.img_size``."""
    from .data import default_norm
    from .pretrain import load_objective
    from .rebuild import read_run_config
    from .viz.reconstruction import plot_reconstruction

    path, run = Path(checkpoint), None
    if path.is_dir():
        run, path = path, path / "objective.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{run} has no objective.safetensors (not a finished pretraining run?)")
    elif (path.parent / "config.json").is_file():
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
    from .rebuild import load_trained

    source = None if source in (None, "", "none") else source
    if source is None and model is None:
        raise ValueError("name the architecture with --model for a random-init model")
    return load_trained(source, model, encoder=True, **{k: v for k, v in model_kwargs.items() if v is not None})


def sample_images(source: str, size: int, in_chans: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images from a named dataset (test split) or a file/folder, decoded by training's decoder
    (``decode_image``: 16-bit, CMYK, alpha ...) and eval-transformed at ``size`` as training validates."""
    from .config import DataCfg
    from .data.build import NAMED, build_dataset, build_transform
    from .data.datasets import ImageFolderDataset, decode_image

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


def run_visualize_collapse(checkpoints: list[str | None], images: str, out: str | Path, model: str | None = None,
                           where: str = "block", limit: int = 256, size: int | None = None,
                           in_chans: int | None = None, stem_stride: int | None = None) -> dict:
    """Feature-collapse numbers (JSON) and plot (PNG) for one or more ConvNeXt checkpoints (run folders, weights
    files, or None / 'none' for a random-init ``model``) on the same images."""
    import json

    from .viz.collapse import feature_collapse, plot_collapse

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

    from .viz.erf import erf_map, high_contribution_area, plot_erf

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


def run_export(checkpoint: str | Path | None, out: str | Path, format: str = "onnx", model: str | None = None,
               img_size: int | tuple[int, int] | None = None, reparam: bool = False, num_classes: int | None = None,
               dynamic_batch: bool = True, random_weights: bool = False, weights: str = "raw"):
    """Write the model of ``checkpoint`` (a run folder, or any weights file; the run's config rebuilds the exact
    model: stem stride, channels, classes, pooling) as ONNX or a torch.export .pt2 file, check the reloaded file
    against PyTorch, and write the preprocessing it expects beside it (``<name>.preprocessing.json``: size,
    resize/crop, mean, std, channels). ``checkpoint=None`` exports random weights only with
    ``random_weights=True`` (then ``model`` names the architecture). ``img_size`` defaults to the run's
    ``data.img_size`` (224 without a run config); ``weights``: raw | ema for a run folder."""
    from .config import DataCfg
    from .export import FORMATS, export_model
    from .export.preprocess import preprocessing_spec, write_preprocessing
    from .rebuild import load_trained

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


# `make demo`: the small_pretrain recipe, sized per data set for a few minutes on a CPU.
DEMO_DATA = {
    # 1-channel 28-px images at 32 px, stem stride 1: a 4x4 grid of 8-px FCMAE patches; 250 steps of batch 64
    "fashion-mnist": {"data.path": "fashion-mnist", "model.in_chans": 1, "model.stem_stride": 1, "data.img_size": 32,
                      "data.batch_size": 64, "data.num_workers": 0, "data.crop_scale_min": 0.5, "optim.epochs": 1,
                      "optim.warmup_epochs": 0.05, "run.max_steps": 250, "run.log_every_steps": 5},
    # random 128-px crops of the 14 bundled photos, stem stride 2: an 8x8 grid of 16-px patches; 4 x 64 steps
    "photos": {"data.path": "photos", "model.stem_stride": 2, "data.img_size": 128, "data.batch_size": 16,
               "data.num_workers": 0, "data.crop_scale_min": 0.2, "optim.epochs": 4, "optim.warmup_epochs": 0.4,
               "run.log_every_steps": 5},
}


def run_pretrain_demo(out: str | Path = "demo_out", data: str | None = None, overrides: list[str] | None = None
                      ) -> dict[str, Path]:
    """Short FCMAE pretraining (the ``small_pretrain`` recipe, ``DEMO_DATA`` sizes) through the engine on
    Fashion-MNIST when installed, else on scikit-image's bundled photos; then reconstructions of held-out images
    and the training curves. ``overrides``: ``key=value`` strings, applied last."""
    from .config import load_config
    from .data.datasets import find_fashion_mnist
    from .pretrain import load_objective
    from .viz.curves import plot_curves
    from .viz.reconstruction import plot_reconstruction
    from .data import default_norm

    if data is None:
        data = "fashion-mnist" if find_fashion_mnist() else "photos"
        if data == "photos":
            print("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): using the photos "
                  "bundled with scikit-image instead")
    out = Path(out)
    sized = [f"{k}={v}" for k, v in DEMO_DATA[data].items()]
    cfg = load_config("small_pretrain", [*sized, f"run.out={out / 'pretrain'}", *(overrides or [])])
    cfg.task = "pretrain"
    res = run_pretrain(cfg)
    obj = load_objective(res.out / "objective.safetensors")
    held = sample_images(data, cfg.data.img_size, cfg.model.in_chans, 8)  # the test split / whole photos
    mean, std = default_norm(cfg.model.in_chans)
    paths = {"pretraining run": res.out, "reconstructions": plot_reconstruction(
        obj, held, out / "fcmae_recon.png", mean, std, mask=obj.make_mask(held, torch.Generator().manual_seed(0)),
        title=f"FCMAE {cfg.model.name} on {data}, {res.state.step} steps: held-out images")}
    paths["curves"] = plot_curves(res.out, out / "fcmae_curves.png")
    return paths


def run_demo(out: str | Path = "demo_out", img_size: int = 224) -> dict[str, Path]:
    """The demo: (1) build every model, measure params / GMACs / CPU throughput -> table + figure;
    (2) a short FCMAE pretraining on the embedded data -> reconstructions + curves."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    machine = machine_description()
    rows = model_table("convnext*", img_size)
    table = format_table(rows, img_size)
    print(table)
    paths = {"zoo table": out / "models.md"}
    paths["zoo table"].write_text(
        f"# maskconv model zoo\n\nThroughput measured once on {machine}, torch {torch.__version__}; other work on the "
        f"machine lowers it (compare ratios, not absolute numbers).\n\n{table}\n"
    )
    (out / "models.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    try:
        from .viz.models import plot_model_table

        paths["zoo figure"] = plot_model_table(rows, out / "models.png", img_size, machine)
        paths.update(run_pretrain_demo(out))
    except ImportError as e:  # matplotlib / scikit-image are the `viz` extra
        print(f"(pictures skipped: {e}; pip install 'maskconv[viz]')")
    print("\ndemo outputs:")
    for k, p in paths.items():
        print(f"  {k}: {Path(p).resolve()}")
    return paths
