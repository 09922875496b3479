"""Cost of a model: multiply-accumulates of one forward (on any device, the meta device included) and measured
CPU inference throughput (``maskconv models``, ``maskconv roadmap``)."""
from __future__ import annotations

import time

import torch


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
