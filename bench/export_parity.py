"""Export parity figures: max |file - PyTorch| for ONNX and torch.export, with and without --reparam.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/export_parity.py convnextv2_tiny slak_tiny replknet_31b --size 224

Random-init weights plus noise on every weight, BatchNorm statistics and affine terms perturbed (as a trained
model has them), so every block and the re-parameterization fold are exercised. Prints one row per
(model, format, reparam) for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from maskconv import create_model
from maskconv.export import export_model


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Noise on every weight (random-init layer scale 1e-6 would mute the blocks, and the merged branches with
    them) and non-trivial BatchNorm statistics / affine terms, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(0.05 * torch.randn(v.shape, generator=g))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--formats", nargs="+", default=["onnx", "torch-export"])
    a = p.parse_args()
    print("| model | format | reparam | max abs diff | max abs diff / max abs output | tolerance | export s |")
    print("|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            torch.manual_seed(0)
            model = create_model(name)
            perturb(model)
            has_reparam = any(hasattr(m, "reparameterize") for m in model.modules())
            with torch.no_grad():
                scale = model.eval()(torch.randn(2, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)))
            scale = scale.abs().max().item()  # same input as export_model's check (seed 0, batch 2)
            for fmt in a.formats:
                for reparam in (False, True) if has_reparam else (False,):
                    r = export_model(model, Path(tmp) / ("m.onnx" if fmt == "onnx" else "m.pt2"), fmt, a.size, reparam=reparam)
                    print(f"| {name} | {fmt} | {'yes' if reparam else 'no'} | {r.max_abs_diff:.2e} | "
                          f"{r.max_abs_diff / scale:.2e} | {r.tolerance:.2e} | {r.export_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
