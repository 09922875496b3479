"""The one training loop, for pretraining and fine-tuning alike: the caller's ``loss_fn`` returns the loss.

Resumable exactly: the sampler is a pure function of (seed, epoch, position), each sample's augmentation is
seeded by (seed, epoch, index), the lr is a pure function of the step, and checkpoints hold the RNG states of
every process. Re-running with the same ``run.out`` continues from ``last.pt``.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..data.datasets import ResumableSampler, SeededDataset, collate_skip, describe_unreadable
from . import dist as D
from .checkpoint import LAST, load_training_checkpoint, save_training_checkpoint
from .optim import build_optimizer
from .schedule import lr_at, set_lr
from .sparsity import build_sparsity, first_batch


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken
    skipped_files: int = 0  # distinct unreadable image files replaced so far (len(unreadable))
    loss_sum: float = 0.0  # running loss of the current epoch (so a resumed epoch reports the whole mean)
    loss_count: int = 0
    unreadable: dict = field(default_factory=dict)  # {path: reason} of those files (this process)


@dataclass
class FitResult:
    out: Path
    state: TrainState
    history: list[dict]
    model: nn.Module  # unwrapped (with FSDP: still sharded; use ``state_dict``)
    ema: nn.Module | None
    state_dict: dict | None = None  # full (unsharded) model weights on CPU, main process only


def _shard(model: nn.Module) -> None:
    """FSDP2: shard every unit the model names (``fsdp_units()``, e.g. ConvNeXt stages), then the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in getattr(model, "fsdp_units", lambda: [])():
        fully_shard(unit)
    fully_shard(model)


def _full_state(model: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, gathered to full CPU tensors under FSDP (a collective: call on all ranks)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def autocast_ctx(amp: str, device: torch.device):
    """``auto``: bf16 on GPU, off on CPU (opt in with ``bf16``); ``fp16`` only on GPU (with GradScaler)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return nullcontext(), None
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("run.amp=fp16 needs a GPU; use bf16 on CPU")
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    raise ValueError(f"run.amp={amp!r}: use auto, off, bf16 or fp16")


class MetricsLog:
    """``metrics.jsonl`` (+ optional TensorBoard) on the main process."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional extra
            except ImportError:
                raise ImportError("run.tensorboard=true needs the tensorboard package: pip install tensorboard") from None

            self.tb = SummaryWriter(str(out / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if self.enabled and self.path.exists():
            keep = [x for x in self.path.read_text().splitlines() if x.strip() and json.loads(x).get("step", 0) <= step]
            self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, row.get("step", 0))


def fit(cfg, model: nn.Module, dataset: Dataset, transform, loss_fn: Callable, *, task: str,
        batch_transform: Callable | None = None, evaluate: Callable | None = None,
        backbone: nn.Module | None = None, info: D.DistInfo | None = None,
        train_mode: Callable[[nn.Module], None] | None = None) -> FitResult:
    """Train ``model`` on ``dataset`` as ``cfg`` says. ``loss_fn(model, images, labels) -> loss``;
    ``batch_transform(images, labels)`` (MixUp/CutMix) runs on each micro-batch; ``evaluate(model) -> dict``
    runs on the main process after every epoch. ``train_mode(model)`` replaces ``model.train()`` at the start of
    each epoch (a linear probe keeps its frozen backbone's BatchNorm statistics in eval mode)."""
    info = info or D.setup(cfg.run.device)
    out = Path(cfg.run.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    model.to(info.device)
    o, r = cfg.optim, cfg.run
    accum = max(1, o.accum_steps)
    full_batches = ResumableSampler(len(dataset), cfg.data.batch_size, world=info.world).num_batches
    steps_per_epoch = full_batches // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{full_batches} batches per epoch is fewer than optim.accum_steps={accum}")
    per_epoch_batches = steps_per_epoch * accum  # whole accumulation cycles only: no gradient spills over
    total_steps = o.epochs * steps_per_epoch
    if r.max_steps:  # a shortened run still gets the whole warmup + cosine schedule
        total_steps = min(total_steps, r.max_steps)
    eff_batch = cfg.data.batch_size * info.world * accum
    lr = o.lr if o.lr is not None else o.blr * eff_batch / 256
    warmup = o.warmup_epochs * steps_per_epoch
    resolved = dict(world_size=info.world, effective_batch=eff_batch, lr=lr, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps, warmup_steps=warmup, images=len(dataset), device=str(info.device))
    if info.is_main:
        print("resolved: " + ", ".join(f"{k}={v}" for k, v in resolved.items()), flush=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "resolved": resolved}, indent=1))

    fsdp = r.fsdp and info.world > 1
    if fsdp:
        if o.ema_decay > 0:
            raise ValueError("optim.ema_decay is not supported with run.fsdp (the EMA copy would not be sharded)")
        _shard(model)
    optimizer = build_optimizer(model, lr, o.weight_decay, o.betas, o.layer_decay, o.layer_decay_scheme, backbone)
    amp_ctx, scaler = autocast_ctx(r.amp, info.device)
    # sparse.sparsity > 0: masks drawn before the EMA copy is taken (a resumed run loads them below)
    sparse = build_sparsity(cfg, model, total_steps, task=task, fsdp=fsdp, world=info.world,
                            fresh=not (out / LAST).exists(), loss_fn=loss_fn,
                            batch=lambda: first_batch(cfg, dataset, transform, batch_transform, info))
    ema = None
    if o.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema_decay), use_buffers=True)

    state = TrainState()
    torch.manual_seed(r.seed * 1000 + info.rank)  # masks / drop path differ between processes
    last = out / LAST
    if last.exists():
        ck = load_training_checkpoint(last)
        if ck["config"]["model"]["name"] != cfg.model.name or ck.get("task") != task:
            raise ValueError(f"{last} is a {ck.get('task')} run of {ck['config']['model']['name']}; this is a "
                             f"{task} run of {cfg.model.name}: choose another run.out")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, ck["model"], options=opts)
            set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=opts)
        else:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        if sparse is not None:
            if ck.get("sparse") is None:
                raise ValueError(f"{last} was written by a dense run; sparse.sparsity>0 needs its own run.out")
            sparse.load_state_dict(ck["sparse"])
        elif ck.get("sparse") is not None:  # resuming dense would let the pruned weights grow back silently
            raise ValueError(f"{last} was written by a sparse run (sparse.sparsity>0); resume it with the same sparse.* "
                             "settings, or start a dense run in another run.out")
        state = TrainState(**ck["state"])
        rng = ck.get("rng", [])
        if len(rng) == info.world:
            torch.set_rng_state(rng[info.rank]["torch"])
            if info.device.type == "cuda" and rng[info.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[info.rank]["cuda"])
        if info.is_main:
            print(f"resumed from {last}: epoch {state.epoch}, step {state.step}", flush=True)

    ddp = model
    if info.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    log = MetricsLog(out, info.is_main, r.tensorboard)
    log.truncate_after(state.step)
    history: list[dict] = []

    def checkpoint(tag: str = LAST) -> None:
        rng = D.all_gather_object({"torch": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None},
                                  info)
        model_sd, optim_sd = _full_state(model, optimizer, fsdp)
        if info.is_main:
            save_training_checkpoint(out / tag, {
                "model": model_sd, "optimizer": optim_sd,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None, "state": asdict(state), "rng": rng,
                "sparse": sparse.state_dict() if sparse is not None else None,
                "config": cfg.to_dict(), "resolved": resolved, "task": task, "model_name": cfg.model.name,
                "maskconv_version": __version__})
        D.barrier(info)

    stop = False
    cur_lr = lr_at(state.step, total_steps, warmup, lr, o.min_lr)
    t_start = time.perf_counter()
    finished = state.step >= total_steps  # e.g. a run.max_steps run re-run with the same --out: nothing to add
    if finished and info.is_main:
        print(f"{out} is already at step {state.step} of {total_steps}: nothing to train", flush=True)
    for epoch in range(state.epoch, state.epoch if finished else o.epochs):
        sampler = ResumableSampler(len(dataset), cfg.data.batch_size, r.seed, epoch, info.rank, info.world,
                                   start_batch=state.batch_in_epoch, max_batches=per_epoch_batches)
        loader = DataLoader(SeededDataset(dataset, transform, r.seed), batch_size=cfg.data.batch_size,
                            sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate_skip,
                            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
                            pin_memory=info.device.type == "cuda")
        (train_mode or nn.Module.train)(model)
        bar = None
        if info.is_main and r.progress:
            from tqdm import tqdm

            bar = tqdm(total=per_epoch_batches, initial=state.batch_in_epoch, desc=f"{task} epoch {epoch + 1}/"
                       f"{o.epochs}", unit="batch", dynamic_ncols=True)
        losses = []
        for images, labels, skipped in loader:
            state.unreadable.update(skipped)  # replaced by SeededDataset (batches stay full); counted once per file
            state.skipped_files = len(state.unreadable)
            micro = state.batch_in_epoch % accum
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            if batch_transform is not None:
                images, labels = batch_transform(images, labels)
            sync = micro == accum - 1
            if fsdp:
                model.set_requires_gradient_sync(sync)
            with (ddp.no_sync() if info.world > 1 and not fsdp and not sync else nullcontext()):
                with amp_ctx:
                    loss = loss_fn(ddp, images, labels)
                if not D.all_true(bool(torch.isfinite(loss)), info):  # every rank stops together
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at step {state.step} (epoch {epoch + 1}, batch "
                        f"{state.batch_in_epoch}); the last good checkpoint {last} is intact. Lower optim.blr, "
                        "set optim.clip_grad, or check the data.")
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            losses.append(loss.item())
            state.loss_sum += losses[-1]
            state.loss_count += 1
            state.batch_in_epoch += 1
            if bar is not None:
                bar.update(1)
            if not sync:
                continue
            cur_lr = lr_at(state.step, total_steps, warmup, lr, o.min_lr)
            set_lr(optimizer, cur_lr)
            if o.clip_grad:
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if sparse is not None:  # after every step, AMP or not: mask weights + momenta; prune/regrow when due
                sparse.step(optimizer, state.step + 1)
            if ema is not None:
                ema.update_parameters(model)
                if sparse is not None:
                    sparse.mask_ema(ema.module)
            state.step += 1
            step_loss = sum(losses[-accum:]) / accum
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{cur_lr:.2e}")
            if state.step % r.log_every_steps == 0:  # same condition on every rank: the all-reduce is safe
                log.write(dict(step=state.step, epoch=epoch + state.batch_in_epoch / per_epoch_batches,
                               loss=D.mean_across(step_loss, info), lr=cur_lr, time=time.perf_counter() - t_start,
                               **({"sparsity": sparse.global_sparsity} if sparse is not None else {})))
            if r.save_every_steps and state.step % r.save_every_steps == 0:
                checkpoint()
            if r.max_steps and state.step >= r.max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()
        epoch_loss = D.mean_across(state.loss_sum / max(1, state.loss_count), info)
        if stop:  # run.max_steps: summarise the partial epoch, keep a resumable checkpoint
            log.write(dict(step=state.step, epoch=epoch + state.batch_in_epoch / per_epoch_batches,
                           train_loss=epoch_loss, lr=cur_lr))
            checkpoint()
            break
        state.epoch, state.batch_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        row = dict(step=state.step, epoch=epoch + 1, train_loss=epoch_loss, lr=cur_lr)
        if evaluate is not None and info.is_main and not fsdp and ((epoch + 1) % max(1, r.eval_every_epochs) == 0
                                                      or epoch + 1 == o.epochs):
            row.update(evaluate(model))  # the trained weights (model.safetensors)
            if ema is not None:  # and their EMA (model_ema.safetensors), named apart
                row.update({f"ema_{k}": v for k, v in evaluate(ema.module).items()})
        log.write(row)
        history.append(row)
        if info.is_main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if (epoch + 1) % max(1, r.save_every_epochs) == 0 or epoch + 1 == o.epochs:
            checkpoint()
    unreadable = {k: v for part in D.all_gather_object(state.unreadable, info) for k, v in part.items()}
    if info.is_main and unreadable:
        print(f"{describe_unreadable(unreadable)}; each was replaced by the next readable image", flush=True)
    full = _full_state(model, optimizer, fsdp)[0] if fsdp else None
    return FitResult(out, state, history, model, ema.module if ema is not None else None,
                     full if info.is_main else None)
