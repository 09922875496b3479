"""torchrun environment: process group (nccl on GPU, gloo on CPU), rank / world size, device choice."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import Device, one_of


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    wait_group: object = field(default=None, repr=False)  # ``long_wait_group``, made by ``setup`` under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_minutes: float = 5.0) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent = one process) and start the process group.
    ``timeout_minutes``: how long a collective waits for a stopped or hung rank before the job ends (the
    loop hands rank 0's validation figures over on a group without this limit: ``long_wait_group``)."""
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
    info = DistInfo(rank, world, local, dev)
    info.wait_group = long_wait_group(info)  # made once, by every rank in the same order (a collective)
    return info


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


def long_wait_group(info: DistInfo, hours: float = 2.0):
    """A process group (gloo: no GPU needed) whose collectives may wait ``hours``: the loop's hand-over of the
    validation figures and the gathers of predictions, while rank 0 alone scores gathered predictions (COCOeval;
    the other ranks go on to the next task's gather and wait there). ``setup`` makes it once (``info.wait_group``)."""
    if info.world == 1:
        return None
    if info.wait_group is not None:
        return info.wait_group
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


# ---- distributed evaluation: every rank scores its own share, the results are reduced exactly ----------------
def eval_share(n: int, info: DistInfo) -> range:
    """This process's share of ``n`` evaluation items: a contiguous block, blocks in rank order, sizes differing by
    at most one. Unlike ``DistributedSampler`` nothing is padded (a repeated image would count twice) and nothing
    is dropped; concatenating the blocks in rank order gives the one-process order (so gathered predictions are
    scored in the same order: COCOeval's stable sort breaks score ties by it)."""
    return range(info.rank * n // info.world, (info.rank + 1) * n // info.world)


def sum_across(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``t`` summed over every process (exact for integer counts); a new tensor on ``t``'s device."""
    if info.world == 1:
        return t.clone()
    out = t.to(info.device if info.device.type == "cuda" else "cpu").clone()
    dist.all_reduce(out)
    return out.to(t.device)


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every process's ``obj``, in rank order, on the main process (None elsewhere): predictions to score once."""
    if info.world == 1:
        return [obj]
    out = [None] * info.world if info.is_main else None
    # on the long-wait group: the next gather may wait while rank 0 scores this one (multi-task Pix2Seq)
    dist.gather_object(obj, out, dst=0, group=long_wait_group(info))
    return out


def broadcast_from_main(obj, info: DistInfo, group=None):
    """The main process's ``obj`` on every process (``group``: e.g. ``long_wait_group``, while rank 0 scores)."""
    if info.world == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def in_lockstep(batches, info: DistInfo, shape_of):
    """Iterate ``batches`` so that every process calls the model the same number of times, as FSDP needs (each
    forward all-gathers the sharded parameters, a collective). Yields ``(batch, shape)``: ``batch`` is this
    process's own (None once they have ended), ``shape`` the input shape to run this step: ``shape_of(batch)``, or
    another process's when this one has no input (then run a dummy input of that shape and discard its output);
    None when no process has an input this step (run nothing). Ends when every process's batches have ended."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        own = shape_of(batch) if batch is not None else None
        rows = all_gather_object((batch is not None, own), info)
        if not any(more for more, _ in rows):
            return
        yield batch, own or next((s for _, s in rows if s is not None), None)
