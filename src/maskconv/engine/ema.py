"""EMA of FSDP-sharded weights: each process keeps the EMA of its own shards.

``torch.optim.swa_utils.AveragedModel`` deep-copies the module, which for an FSDP2 (``fully_shard``) module
would copy its sharding hooks too, and averages whole tensors. Here the EMA is a plain list of local tensors
(each parameter's ``DTensor.to_local()`` shard; buffers, which FSDP2 does not shard, whole) updated with the
same ``multi_avg_fn`` as the unsharded path, so the arithmetic per element is the one of ``AveragedModel``: an
FSDP run's EMA equals a one-process run's up to the float noise of the weights themselves. To evaluate or save
it, the EMA is swapped into the sharded model (``applied``), which then runs and gathers as usual, and swapped
back. The checkpoint layout is ``AveragedModel``'s (``module.<key>`` + ``n_averaged``), so a run's ``last.pt``
reads the same either way (``maskconv eval``, resume).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter's local shard (a DTensor's ``to_local()``), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def reshard(model: nn.Module) -> None:
    """Return every FSDP2 unit of ``model`` to its shards. Needed after a forward without backward (evaluation):
    the root unit stays unsharded after its forward (FSDP2 expects the backward next), and its parameters are
    then full plain tensors, not the shards the optimizer and the EMA hold."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardedEMA:
    """EMA of an FSDP2-sharded ``model``'s parameters and buffers, shard by shard (``use_buffers=True`` as the
    unsharded ``AveragedModel``): the first update copies the weights, later ones call ``multi_avg_fn(ema, weights,
    n_averaged)`` on the local tensors. ``state_dict`` / ``applied`` are collectives: call them on every process."""

    def __init__(self, model: nn.Module, multi_avg_fn: Callable):
        self.model, self.avg_fn = model, multi_avg_fn
        self.tensors = [_local(t).detach().clone() for t in self._weights()]
        self.n_averaged = torch.zeros((), dtype=torch.long)

    def _weights(self) -> list[torch.Tensor]:
        return list(itertools.chain(self.model.parameters(), self.model.buffers()))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if model is not self.model:
            raise ValueError("ShardedEMA follows the model it was built from")
        now = [_local(t).detach() for t in self._weights()]
        if self.n_averaged == 0:
            for e, w in zip(self.tensors, now):
                e.copy_(w)
        else:  # as AveragedModel: one call per dtype group (integer buffers are copied by the avg fn)
            groups: dict = {}
            for e, w in zip(self.tensors, now):
                groups.setdefault((e.device, e.dtype), ([], []))
                groups[(e.device, e.dtype)][0].append(e)
                groups[(e.device, e.dtype)][1].append(w)
            for ema, weights in groups.values():
                self.avg_fn(ema, weights, self.n_averaged)
        self.n_averaged += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for e, w in zip(self.tensors, self._weights()):
            w = _local(w)
            keep = w.clone()
            w.copy_(e)
            e.copy_(keep)

    @contextmanager
    def applied(self):
        """The model holding the EMA weights inside the block (every process together), its own after it."""
        reshard(self.model)  # an unsharded unit would run its all-gathered copy of the old weights
        self._swap()
        try:
            yield self.model
        finally:
            reshard(self.model)
            self._swap()

    def full_state_dict(self) -> dict:
        """The EMA weights gathered to full CPU tensors under the model's keys (main process; empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with self.applied():
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self) -> dict:
        """``AveragedModel``'s layout (``module.<key>``, ``n_averaged``), full tensors, on the main process."""
        sd = self.full_state_dict()
        return {**{f"module.{k}": v for k, v in sd.items()}, "n_averaged": self.n_averaged.clone()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Load an ``AveragedModel`` state (full tensors, on every process) into the shards; the model's own
        weights are left as they were."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        reshard(self.model)
        own = [_local(w).detach().clone() for w in self._weights()]
        set_model_state_dict(self.model, {k[len("module."):]: v for k, v in sd.items() if k.startswith("module.")},
                             options=StateDictOptions(full_state_dict=True))
        for e, w, o in zip(self.tensors, self._weights(), own):
            e.copy_(_local(w))
            _local(w).copy_(o)
        self.n_averaged = sd["n_averaged"].clone().long().reshape(())
