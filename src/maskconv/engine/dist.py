"""torchrun environment: process group (nccl on GPU, gloo on CPU), rank / world size, device choice."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Device, one_of


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_minutes: float = 5.0) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent = one process) and start the process group.
    ``timeout_minutes``: how long a collective waits for a stopped or hung rank before the job ends (the loop
    waits for rank 0's validation apart, on a group without this limit: ``wait_for_main``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is available (use run.device=cpu or auto)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"run.device={device!r}: use {one_of(Device)}")
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local, dev)


def teardown(clean: bool = True) -> None:
    """Destroy the process group while the interpreter is fully alive.

    ``clean``: this rank finished without error, so every rank is expected here: meet at a barrier first, so no
    rank tears down its gloo/nccl threads while a peer still has work in flight with it. Then drop the last
    Python references (FSDP / DeviceMesh hold the group) so the backend's C++ threads are joined now, not during
    interpreter finalization, where a still-joinable worker thread aborts the process ("terminate called without
    an active exception") and torchrun reports a finished run as failed. After an error there is no barrier (a
    failed peer would never arrive)."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    import gc

    gc.collect()


def all_gather_object(obj, info: DistInfo) -> list:
    if info.world == 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` is True on every process (so all ranks take the same branch)."""
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag True if it is True on any process (one collective for all of them)."""
    if info.world == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def wait_for_main(info: DistInfo, group) -> None:
    """The other ranks wait for rank 0's validation on ``group`` (made with a long timeout), so the run's
    collective timeout can stay short without cutting a long validation."""
    if info.world > 1:
        dist.barrier(group=group)


def long_wait_group(info: DistInfo, hours: float = 2.0):
    """A process group (gloo: a barrier needs no GPU) whose collectives may wait ``hours`` (validation on rank 0)."""
    if info.world == 1:
        return None
    from datetime import timedelta

    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def mean_across(value: float, info: DistInfo) -> float:
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / info.world


def to_device(labels, device: torch.device):
    """A batch's labels on ``device``: a tensor, or a list of per-image target dicts (detection; their tensors
    move, other values stay)."""
    if isinstance(labels, torch.Tensor):
        return labels.to(device, non_blocking=True)
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in labels]
