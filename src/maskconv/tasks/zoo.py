"""``maskconv models``: the registered models with params, GMACs and (optionally) measured CPU throughput."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..commands import Command
from ..models import create_model, list_models
from ..models.measure import count_macs, measure_throughput


@dataclass
class ModelRow:
    name: str
    params_m: float  # millions, with the default 1000-class head
    gmacs: float  # multiply-accumulates / 1e9 at img_size (what the ConvNeXt papers call "FLOPs")
    img_per_s: float | None  # measured inference throughput on this machine, None if skipped


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


def _arguments(p) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'convnextv2_*'")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--throughput", action="store_true", help="also measure CPU inference img/s (<=30M params)")


def _cli(args) -> int | None:
    rows = model_table(args.pattern, args.img_size, throughput_max_params_m=30.0 if args.throughput else 0.0)
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 2
    print(format_table(rows, args.img_size))
    return None


COMMAND = Command("list registered models with params and GMACs", _arguments, _cli)
