"""Everything the CLI does, as importable functions (the CLI only parses arguments and calls these)."""
from __future__ import annotations

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


def format_table(rows: list[ModelRow], img_size: int = 224) -> str:
    lines = [f"| model | params (M) | GMACs @{img_size} | CPU img/s @{img_size} |", "|---|---:|---:|---:|"]
    for r in rows:
        ips = "—" if r.img_per_s is None else f"{r.img_per_s:.1f}"
        lines.append(f"| {r.name} | {r.params_m:.2f} | {r.gmacs:.2f} | {ips} |")
    return "\n".join(lines)


def run_photo_pretrain(model: str = "convnextv2_atto", patch_size: int = 2, size: int = 128, batch: int = 16,
                       steps: int = 250, lr: float = 1.5e-3, mask_ratio: float = 0.6, decoder_dim: int = 256,
                       out: str | Path = "bench_out", png: str | Path | None = None, seed: int = 0) -> dict:
    """Short FCMAE pretraining on scikit-image's bundled photos (random crops, no download), then a
    reconstruction picture of held-out crops. AdamW (0.9, 0.95), warmup + cosine, as the official recipe.
    Until the full engine lands this is the library's quick real-data run (demo and bench)."""
    import json
    import math

    from torch.utils.data import DataLoader

    from .data import IMAGENET_MEAN, IMAGENET_STD, PhotoCrops
    from .pretrain import create_objective, save_objective
    from .viz.reconstruction import plot_reconstruction

    torch.manual_seed(seed)
    obj = create_objective("fcmae", model=model, model_kwargs=dict(patch_size=patch_size),
                           decoder_dim=decoder_dim, mask_ratio=mask_ratio)
    data = DataLoader(PhotoCrops(size=size, length=steps * batch), batch_size=batch, drop_last=True)
    opt = torch.optim.AdamW(obj.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    from tqdm import tqdm

    log = []
    obj.train()
    bar = tqdm(data, desc=f"FCMAE {model}", unit="step")
    for x in bar:
        loss = obj(x).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {len(log)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_objective(obj, out / "fcmae_photos.safetensors")
    (out / "fcmae_photos_loss.json").write_text(json.dumps(log))
    torch.manual_seed(seed + 123)  # held-out crops: a fresh RNG stream, not crops seen in training
    crops = PhotoCrops(size=size, length=6)
    held = torch.stack([crops[i] for i in range(6)])
    k = min(25, len(log))
    png = plot_reconstruction(
        obj, held, png or out / "fcmae_recon.png", IMAGENET_MEAN, IMAGENET_STD,
        title=f"FCMAE {model} (patch {obj.patch_size}px), {steps} steps on bundled photos: loss "
              f"{sum(log[:k]) / k:.3f} (first {k}) -> {sum(log[-k:]) / k:.3f} (last {k})")
    return dict(checkpoint=ckpt, picture=Path(png), loss=log)


def run_visualize_recon(checkpoint: str | Path, images: str | Path, out: str | Path, size: int | None = None,
                        mask_ratio: float | None = None, seed: int = 0, limit: int = 8) -> Path:
    """Reconstruction PNG from a pretraining checkpoint (``save_objective`` file) on images from a file or
    folder: rows of original | masked | prediction | prediction + visible."""
    from .data import default_norm, load_images
    from .pretrain import load_objective
    from .viz.reconstruction import plot_reconstruction

    obj = load_objective(checkpoint, **({} if mask_ratio is None else {"mask_ratio": mask_ratio}))
    p = obj.patch_size
    size = size or max(p, 224 // p * p)
    if size % p:
        raise ValueError(f"--size {size} must be a multiple of the patch size {p}")
    x = load_images(images, size, obj.in_chans, limit)
    mean, std = default_norm(obj.in_chans)
    mask = obj.make_mask(x, generator=torch.Generator().manual_seed(seed))
    path = plot_reconstruction(obj, x, out, mean, std, mask=mask)
    print(f"wrote {Path(path).resolve()}")
    return path


def run_demo(out: str | Path = "demo_out", img_size: int = 224, pretrain_steps: int = 150) -> dict[str, Path]:
    """The demo: (1) build every model and measure params / GMACs / CPU throughput -> table + figure;
    (2) a short FCMAE pretraining on the bundled photos -> checkpoint + reconstruction picture."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = model_table("convnext*", img_size)
    table = format_table(rows, img_size)
    print(table)
    paths = {"table": out / "models.md"}
    paths["table"].write_text(
        f"# maskconv model zoo (measured on this machine, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\n\n{table}\n"
    )
    (out / "models.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    try:
        from .viz.models import plot_model_table

        paths["zoo figure"] = plot_model_table(rows, out / "models.png", img_size)
        res = run_photo_pretrain(steps=pretrain_steps, out=out, png=out / "fcmae_recon.png")
        paths["pretraining checkpoint"] = res["checkpoint"]
        paths["reconstructions"] = res["picture"]
    except ImportError as e:  # matplotlib / scikit-image are the `viz` extra
        print(f"(pictures skipped: {e}; pip install 'maskconv[viz]')")
    for k, p in paths.items():
        print(f"{k}: {p.resolve()}")
    return paths
