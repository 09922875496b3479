"""``maskconv demo`` (``make demo``): the main job on the embedded data, zoo table + short FCMAE pretraining."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..commands import Command
from ..engine.rundir import RunDir
from .pretrain import run_pretrain
from .visualize import sample_images
from .zoo import format_table, machine_description, model_table


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
    from ..config import load_config
    from ..data.datasets import find_fashion_mnist
    from ..pretrain import load_objective
    from ..viz.curves import plot_curves
    from ..viz.reconstruction import plot_reconstruction
    from ..data import default_norm

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
    obj = load_objective(res.out / RunDir.OBJECTIVE)
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
        from ..viz.models import plot_model_table

        paths["zoo figure"] = plot_model_table(rows, out / "models.png", img_size, machine)
        paths.update(run_pretrain_demo(out))
    except ImportError as e:  # matplotlib / scikit-image are the `viz` extra
        print(f"(pictures skipped: {e}; pip install 'maskconv[viz]')")
    print("\ndemo outputs:")
    for k, p in paths.items():
        print(f"  {k}: {Path(p).resolve()}")
    return paths


def _arguments(p) -> None:
    p.add_argument("--out", default="demo_out")


def _cli(args) -> None:
    run_demo(args.out)


COMMAND = Command("the main job on the embedded data: zoo table + short FCMAE pretraining", _arguments, _cli)
