"""The training step's device side: compiling the model's forward (``run.compile``) and a loss watch that keeps
the running loss and the first non-finite micro-batch on the device.

On a GPU every ``loss.item()``, ``bool(isfinite(loss))`` or all-reduce of a host value stops the host until the
device has caught up, so the next kernels are not queued in time. The loop therefore only *accumulates* on the
device per micro-batch (``LossWatch.update``) and reads the watch (one sync) when it logs, checkpoints or ends an
epoch; the objectives' steps have static shapes and no host reads (masks with a fixed visible count, indices from
a sort, validation skipped under ``torch.compile``), so each compiles to one graph (``fullgraph=True``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import dist as D

__all__ = ["LossWatch", "NonFinite", "compile_model"]


def compile_model(model: nn.Module, mode: str = "default", dynamic: bool | None = None) -> nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``: the state-dict keys stay as they are) as one
    graph: ``fullgraph=True`` makes a graph break an error at the first step instead of a silent slowdown."""
    model.compile(fullgraph=True, mode=None if mode == "default" else mode, dynamic=dynamic)
    return model


@dataclass
class NonFinite:
    """The first non-finite loss of a run: its global micro-batch number (0-based, across epochs) and value."""
    micro: int
    value: float


class LossWatch:
    """Loss sums and the first non-finite micro-batch, as device tensors: ``update`` per micro-batch queues a few
    tiny kernels and never waits for the device; ``first_non_finite``, ``step_mean`` and ``take_sum`` read it."""

    def __init__(self, device: torch.device):
        acc = torch.float32 if device.type == "mps" else torch.float64  # a long epoch's sum keeps its digits
        self._first = torch.zeros((), dtype=torch.long, device=device)  # 1 + micro-batch number; 0 = none yet
        self._value = torch.zeros((), device=device)
        self._sum = torch.zeros((), dtype=acc, device=device)  # since the last take_sum()
        self._step_sum = torch.zeros((), dtype=acc, device=device)  # this optimizer step's micro-batches

    def new_step(self) -> None:
        self._step_sum.zero_()

    def update(self, loss: torch.Tensor, micro: int) -> None:
        """Record micro-batch ``micro``'s loss (a 0-d tensor): no host sync."""
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self._first == 0)
        self._first = torch.where(new, micro + 1, self._first)
        self._value = torch.where(new, loss, self._value)
        self._sum += loss
        self._step_sum += loss

    def snapshot_sum(self) -> torch.Tensor:
        """A device copy of the running sum (no sync), to restore a step boundary's state later."""
        return self._sum.clone()

    def first_non_finite(self, info: D.DistInfo) -> NonFinite | None:
        """The earliest non-finite micro-batch on any process, or None (a collective: call on every rank)."""
        first = int(self._first)  # the one host sync
        if D.all_true(first == 0, info):
            return None
        rows = [r for r in D.all_gather_object((first, float(self._value)), info) if r[0] > 0]
        micro, value = min(rows)
        return NonFinite(micro - 1, value)

    def step_mean(self, accum: int) -> float:
        """Mean loss of the current optimizer step's ``accum`` micro-batches (one sync)."""
        return float(self._step_sum) / accum

    def take_sum(self) -> float:
        """The loss sum since the last call (one sync), and reset it."""
        s = float(self._sum)
        self._sum.zero_()
        return s
