"""The one training loop, for pretraining and fine-tuning alike: the caller's ``loss_fn`` returns the loss.

Resumable exactly: the sampler is a pure function of (seed, epoch, position), each sample's augmentation (and,
for pretraining, its mask) is seeded by (seed, epoch, index), the lr is a pure function of the step, and
checkpoints hold the RNG states of every process. Re-running with the same ``run.out`` continues from
``last.pt``; the run folder's lock and provenance rules are in ``engine/rundir.py``.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..data.datasets import ResumableSampler, SeededDataset, collate_skip, describe_unreadable, forked_rngs
from ..data.stream import StreamDataset
from . import dist as D
from ..models import CheckpointError
from .checkpoint import load_training_checkpoint, save_training_checkpoint
from .loggers import build_logger
from .rundir import RunDir, RunFolderBusy, check_resume, data_fingerprint, format_changes
from .optim import build_optimizer
from .schedule import lr_at, set_lr
from .sparsity import build_sparsity, first_batch
from .step import LossWatch, NonFinite, compile_model
from ..config import Amp, Resolved, one_of, resolve


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken
    skipped_files: int = 0  # distinct unreadable image files replaced so far (len(unreadable))
    loss_sum: float = 0.0  # running loss of the current epoch (so a resumed epoch reports the whole mean)
    loss_count: int = 0
    unreadable: dict = field(default_factory=dict)  # {path: reason} of those files (this process)
    best: dict = field(default_factory=dict)  # run.keep_best: {metric, mode, value, epoch, step} of best.safetensors


@dataclass
class FitResult:
    out: Path
    state: TrainState
    history: list[dict]
    model: nn.Module  # unwrapped (with FSDP: still sharded; use ``state_dict``)
    ema: nn.Module | None
    state_dict: dict | None = None  # full (unsharded) model weights on CPU, main process only
    ema_state_dict: dict | None = None  # with FSDP: the full EMA weights on CPU, main process only (``ema`` is None)
    run: RunDir | None = None  # still locked: the caller writes its weights files, then ``run.release()``


class Interrupted(Exception):
    """Ctrl-C / SIGTERM ended the run at a step boundary after saving a checkpoint."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; re-run the same command to resume")
        self.step, self.signum = step, signum


# lr below which a resolved lr is implausibly small for the task (the blr rule at a small batch)
LOW_LR = {"pretrain": 1e-5, "finetune": 1e-5, "linprobe": 1e-4}


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
    raise ValueError(f"run.amp={amp!r}: use {one_of(Amp)}")


class MetricsLog:
    """``metrics.jsonl`` (+ the ``run.logger`` tracker, ``engine/loggers.py``) on the main process."""

    def __init__(self, out: Path, enabled: bool, logger: str = "none", config: dict | None = None):
        self.enabled = enabled
        self.path = out / RunDir.METRICS
        self.tracker = build_logger(logger, out, config or {}) if enabled else None

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again). A torn last line
        (a crash mid-append) is trimmed with a warning; a damaged line elsewhere is an error naming the file."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [x for x in self.path.read_text(errors="replace").splitlines() if x.strip()]
        rows = []
        for n, x in enumerate(lines):
            try:
                rows.append((x, json.loads(x)))
            except json.JSONDecodeError:
                if n != len(lines) - 1:
                    raise ValueError(f"{self.path}: line {n + 1} is not JSON (a damaged metrics log); repair or "
                                     "remove that line to resume") from None
                print(f"warning: {self.path}: trimmed a torn last line (a crash mid-write): {x[:60]!r}", flush=True)
        keep = [x for x, row in rows if row.get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()



class _Keyed(Dataset):
    """Each item with its sampler key ``(global index, epoch)``: per-sample randomness (masks) is drawn from it."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        return self.ds[item], item


def _collate_keyed(batch):
    """``collate_skip`` + the global indices (B,) of the batch (training replaces bad files: nothing dropped)."""
    images, labels, bad = collate_skip([b for b, _ in batch])
    return images, labels, bad, torch.tensor([k[0] for _, k in batch], dtype=torch.long)


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(dataset: Dataset, transform, seed: int, batch_size: int, info: D.DistInfo, max_batches: int, *,
                 num_workers: int, prefetch_factor: int = 2) -> DataLoader:
    """The training DataLoader of a whole ``fit``: built once, so its worker processes (when ``num_workers`` > 0)
    persist from epoch to epoch instead of being started again every epoch (a fork, or under ``spawn`` a fresh
    interpreter and the pickled dataset). Its ``ResumableSampler`` (``loader.sampler``) runs in the main process:
    ``train_one_epoch`` sets its ``epoch`` and ``start_batch`` before iterating, and each sample's randomness is
    keyed by (index, epoch), so which process prepares a sample changes nothing. Batches are pinned on CUDA
    (asynchronous host-to-device copy)."""
    if isinstance(dataset, StreamDataset):
        return StreamLoader(dataset, transform, seed, batch_size, info, max_batches, num_workers=num_workers,
                            prefetch_factor=prefetch_factor)
    sampler = ResumableSampler(len(dataset), batch_size, seed, 0, info.rank, info.world, max_batches=max_batches)
    return DataLoader(_Keyed(SeededDataset(dataset, transform, seed)), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate_keyed,
                      generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
                      worker_init_fn=_ignore_sigint, pin_memory=info.device.type == "cuda",
                      persistent_workers=num_workers > 0, prefetch_factor=prefetch_factor if num_workers > 0 else None)


@dataclass
class _EpochCursor:
    """Where an epoch starts: what ``train_one_epoch`` sets on ``loader.sampler`` (a ``ResumableSampler`` has the
    same two fields)."""
    epoch: int = 0
    start_batch: int = 0


class StreamLoader:
    """``train_loader`` for a stream (``data/stream.py``): a DataLoader per epoch over that epoch's
    ``StreamDataset.epoch_iterable`` (an iterable is cut for one epoch and start, so its workers cannot outlive
    it; a stream's epoch is long enough that starting them is no cost worth keeping). ``sampler`` holds the
    epoch and start batch the next iteration reads."""

    def __init__(self, dataset, transform, seed: int, batch_size: int, info: D.DistInfo, max_batches: int, *,
                 num_workers: int, prefetch_factor: int = 2):
        self.dataset, self.transform, self.seed, self.batch_size, self.info = dataset, transform, seed, batch_size, info
        self.num_batches = min(len(dataset) // (batch_size * info.world), max_batches)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.sampler = _EpochCursor()
        note = dataset.uneven_note(info.world * max(1, num_workers))
        if note and info.is_main:
            print(f"note: {note}", flush=True)

    def __iter__(self):
        c, info, w = self.sampler, self.info, self.num_workers
        epoch = self.dataset.epoch_iterable(self.transform, self.seed, c.epoch, info.rank, info.world, self.batch_size,
                                            self.num_batches, start_batch=c.start_batch, num_workers=w)
        return iter(DataLoader(epoch, batch_size=self.batch_size, num_workers=w, collate_fn=_collate_keyed,
                               generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
                               worker_init_fn=_ignore_sigint, pin_memory=info.device.type == "cuda",
                               prefetch_factor=self.prefetch_factor if w > 0 else None))


class _StopSignals:
    """First SIGINT / SIGTERM: ask the loop to stop at the next step boundary; a second SIGINT stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def ema_warmup_fn(decay: float, warmup: bool) -> Callable:
    """``multi_avg_fn`` for ``AveragedModel``: EMA with timm's ModelEmaV3 warm-up (gamma 1, power 2/3): after
    ``n`` updates the decay is ``min(decay, 1 - (1 + n)^(-2/3))``, so a short run's EMA follows the weights."""

    @torch.no_grad()
    def update(ema_params, params, n_averaged) -> None:
        d = min(decay, 1 - (1 + float(n_averaged)) ** (-2 / 3)) if warmup else decay
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            for e, p in zip(ema_params, params):
                e.copy_(p)

    return update


def _finite(model: nn.Module, info: D.DistInfo) -> bool:
    """Every parameter finite on every process (FSDP: each process checks its shards)."""
    ok = all(bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all()) for p in model.parameters())
    return D.all_true(ok, info)


def _open_run(cfg, run: RunDir, info: D.DistInfo, task: str, record: dict, files: dict | None):
    """Lock the run folder, read its checkpoint and refuse a resume with other training settings, all before
    writing anything; then write the start record (a fresh run only) and ``files``. Returns (checkpoint or
    None, the accepted changes to record once the checkpoint has loaded)."""
    err = None
    if info.is_main:
        try:
            run.lock()
        except RunFolderBusy as e:
            err = e
    if not D.all_true(err is None, info):
        raise err or RunFolderBusy(f"run folder {run.path} is in use (rank 0 could not lock it)")
    last = run.file(RunDir.LAST)
    ck = load_training_checkpoint(last) if last.exists() else None
    changes = []
    if ck is not None:
        if ck["config"]["model"]["name"] != cfg.model.name or ck.get("task") != task:
            raise ValueError(f"{last} is a {ck.get('task')} run of {ck['config']['model']['name']}; this is a "
                             f"{task} run of {cfg.model.name}: choose another run.out")
        step = ck["state"].get("step", 0) if isinstance(ck["state"], dict) else 0
        old = {**ck["config"], "resolved": ck.get("resolved", {})}
        changes = check_resume(run, step, old, record, cfg.run.allow_config_change)
    if info.is_main:
        run.remove_stale_tmp()
        if ck is None:  # a fresh start (or one whose earlier attempt saved no checkpoint): nothing trained yet
            run.file(run.CONFIG).write_text(json.dumps(record, indent=1))
        for name, text in (files or {}).items():
            run.file(name).write_text(text)
    D.barrier(info)
    return ck, changes


def _restore(ck: dict, last: Path, model, optimizer, scaler, ema, sparse, fsdp: bool, info: D.DistInfo) -> TrainState:
    """Load a training checkpoint into the run's objects; a mismatch is one line (CheckpointError)."""
    try:
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
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])[:400]
        raise CheckpointError(f"{last} does not fit this model ({detail}); resume with the run's settings or "
                              "choose another run.out") from None
    if sparse is not None:
        if ck.get("sparse") is None:
            raise ValueError(f"{last} was written by a dense run; dynamic_sparsity.sparsity>0 needs its own run.out")
        sparse.load_state_dict(ck["sparse"])
    elif ck.get("sparse") is not None:  # resuming dense would let the pruned weights grow back silently
        raise ValueError(f"{last} was written by a sparse run (dynamic_sparsity.sparsity>0); resume it with the same "
                         "dynamic_sparsity.* settings, or start a dense run in another run.out")
    unknown = sorted(set(ck["state"]) - set(TrainState.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{last} has training-state fields this version does not know: {', '.join(unknown)} "
                              "(written by a newer maskconv?)")
    state = TrainState(**ck["state"])
    rng = ck.get("rng", [])
    if len(rng) == info.world:
        torch.set_rng_state(rng[info.rank]["torch"])
        if info.device.type == "cuda" and rng[info.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[info.rank]["cuda"])
    return state


def fit(cfg, model: nn.Module, dataset: Dataset, transform, loss_fn: Callable, *, task: str,
        batch_transform: Callable | None = None, evaluate: Callable | None = None,
        backbone: nn.Module | None = None, info: D.DistInfo | None = None,
        train_mode: Callable[[nn.Module], None] | None = None, files: dict[str, str] | None = None,
        keyed_loss: bool = False) -> FitResult:
    """Train ``model`` on ``dataset`` as ``cfg`` says. ``loss_fn(model, images, labels) -> loss`` (with
    ``keyed_loss``: ``loss_fn(model, images, labels, keys=(indices (B,), epoch))`` for per-sample randomness);
    ``batch_transform(images, labels)`` (MixUp/CutMix) runs on each micro-batch; ``evaluate(model) -> dict``
    runs on every process after each evaluated epoch, each scoring its share of the validation data (under FSDP
    every process must run each forward: ``dist.in_lockstep``); the main process's figures are the ones logged
    (``evaluate_all``). ``run.keep_best`` keeps the best evaluated epoch's weights (``_KeepBest``).
    ``train_mode(model)`` replaces ``model.train()`` at the start of each epoch (a linear probe keeps its frozen
    backbone's BatchNorm statistics in eval mode). ``files`` (name -> text) are written into the run folder once
    it is locked and checked. The returned ``run`` is still locked: release it after writing the final files.

    As MAE's ``main_pretrain`` / ``engine_pretrain``: resolve and open the run folder (here), set up the model,
    optimizer, AMP, sparsity and EMA (``_setup``), restore a checkpoint (``_resume``), then ``train_one_epoch``
    per epoch with the epoch's summary, evaluation and checkpoint in ``_train``."""
    check_keep_best(cfg.run.keep_best, evaluate is not None, cfg.optim.ema_decay > 0)
    info = info or D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    run = RunDir(cfg.run.out)
    plan = resolve(cfg, info.world, ResumableSampler(len(dataset), cfg.data.batch_size, world=info.world).num_batches)
    resolved = dict(world_size=plan.world_size, effective_batch=plan.effective_batch, lr=plan.lr,
                    steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                    images=len(dataset), device=str(info.device), data_fingerprint=data_fingerprint(dataset))
    if isinstance(dataset, StreamDataset):  # the sub-stream cut: a resume with another one is refused
        resolved["stream_readers"] = dataset.readers(info.world, cfg.data.num_workers)
    try:
        ck, changes = _open_run(cfg, run, info, task, {**cfg.to_dict(), "resolved": resolved}, files)
        return _train(cfg, model, dataset, transform, loss_fn, task, batch_transform, evaluate, backbone, info,
                      train_mode, keyed_loss, run, ck, changes, resolved, plan)
    except BaseException:  # refused, failed or interrupted: the folder is free again
        run.release()
        raise


@dataclass
class Training:
    """What ``_setup`` builds for a run and every epoch uses."""
    model: nn.Module  # unwrapped (FSDP: sharded in place)
    ddp: nn.Module  # what the loss is computed through: DDP-wrapped under torchrun, else ``model``
    optimizer: torch.optim.Optimizer
    amp_ctx: object  # autocast context (or nullcontext)
    scaler: object  # GradScaler for fp16, else None
    sparse: object  # DynamicSparsity or None
    ema: object  # AveragedModel, with FSDP ShardedEMA (engine/ema.py), or None
    fsdp: bool


def _setup(model: nn.Module, o, r, sparse_cfg, plan: Resolved, info: D.DistInfo, *, task: str, backbone, fresh: bool,
           loss_fn: Callable, batch: Callable) -> Training:
    """Move (and under FSDP shard) the model, build the optimizer, AMP, dynamic sparsity and EMA."""
    model.to(info.device)
    fsdp = r.fsdp and info.world > 1
    if fsdp:
        _shard(model)
    optimizer = build_optimizer(model, plan.lr, o.weight_decay, o.betas, o.layer_decay, o.layer_decay_scheme,
                                backbone, name=o.name)
    amp_ctx, scaler = autocast_ctx(r.amp, info.device)
    # dynamic_sparsity.sparsity > 0: masks drawn before the EMA copy is taken (a resumed run loads them in _resume)
    sparse = build_sparsity(sparse_cfg, model, plan.total_steps, seed=r.seed, task=task, fsdp=fsdp, world=info.world,
                            fresh=fresh, loss_fn=loss_fn, batch=batch)
    ema = None
    if o.ema_decay > 0 and fsdp:  # the EMA of each process's own shards (engine/ema.py)
        from .ema import ShardedEMA

        ema = ShardedEMA(model, ema_warmup_fn(o.ema_decay, o.ema_warmup))
    elif o.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(o.ema_decay, o.ema_warmup), use_buffers=True)
    if r.compile:  # after the EMA copy (a plain module) is taken; the state-dict keys do not change
        compile_model(model, r.compile_mode, r.compile_dynamic)
    return Training(model, model, optimizer, amp_ctx, scaler, sparse, ema, fsdp)


def _wrap_ddp(t: Training, info: D.DistInfo) -> None:
    """DDP under torchrun (not FSDP): ``t.ddp`` computes the loss and syncs gradients."""
    if info.world > 1 and not t.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        t.ddp = DistributedDataParallel(t.model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def _resume(t: Training, ck: dict, last: Path, run: RunDir, changes: list, info: D.DistInfo
            ) -> tuple[TrainState, list[dict]]:
    """Load ``ck`` into the run's objects and record accepted config changes. Returns (state, config history)."""
    state = _restore(ck, last, t.model, t.optimizer, t.scaler, t.ema, t.sparse, t.fsdp, info)
    config_history = list(ck.get("config_history", []))
    if info.is_main:
        print(f"resumed from {last}: epoch {state.epoch}, step {state.step}", flush=True)
        if changes:  # recorded only now that the checkpoint has loaded into the changed run
            config_history.append(run.append_history(state.step, changes))
            print(f"config change recorded at step {state.step} ({run.file(run.HISTORY)}): "
                  f"{format_changes(changes)}", flush=True)
    return state, config_history


class _Checkpointer:
    """Writes ``last.pt`` (``__call__``) and remembers the step it holds and when it was written; owns the
    device-side loss watch (``engine.step.LossWatch``), read here and at log steps, never per micro-batch."""

    def __init__(self, t: Training, state: TrainState, last: Path, info: D.DistInfo, meta: dict,
                 config_history: list[dict], accum: int, per_epoch_batches: int):
        self.t, self.state, self.last, self.info, self.meta = t, state, last, info, meta
        self.config_history = config_history  # accepted config changes (also in every checkpoint)
        self.saved_step = state.step if last.exists() else None  # the step last.pt holds
        self.last_save = time.monotonic()
        self.accum, self.per_epoch_batches = accum, per_epoch_batches
        self.watch = LossWatch(info.device)  # loss sums and the first non-finite loss
        self.boundary = None  # (state, device loss sum, rng) at the start of the current optimizer step

    def nan_stop(self, bad: NonFinite, before_update: bool) -> None:
        """Stop at a non-finite loss, naming its step; when it is read at the step it happened in, before the
        update, write the last finite step's checkpoint first (the state saved at that step's start)."""
        state = self.state
        step = bad.micro // self.accum + 1
        if before_update and step == state.step + 1 and state.step > 0 and self.saved_step != state.step:
            at, at_sum, rng = self.boundary
            at.loss_sum += float(at_sum)
            self(rng, at=at)
        now = state.step + (1 if before_update else 0)
        late = "" if step == now else \
            f" (noticed at step {now}: the loss is read every run.log_every_steps steps and at checkpoints)"
        _nan_stop(bad.value, step, bad.micro // self.per_epoch_batches, bad.micro % self.per_epoch_batches, late,
                  self.last, self.saved_step)

    def __call__(self, local_rng: dict | None = None, at: TrainState | None = None) -> bool:
        """Write last.pt unless the loss went non-finite since the last read (then stop, naming its step) or a
        weight is non-finite (then the older checkpoint stays); True if written. ``at``: the state to save (the
        NaN stop's last finite step boundary) instead of the current one."""
        t, info, last = self.t, self.info, self.last
        if at is None:
            bad = self.watch.first_non_finite(info)
            if bad is not None:
                self.nan_stop(bad, before_update=False)
            self.state.loss_sum += self.watch.take_sum()
        state = at or self.state
        if not _finite(t.model, info):
            if info.is_main:
                print(f"warning: non-finite weights at step {state.step}: {last} not overwritten", flush=True)
            return False
        rng = D.all_gather_object(local_rng or {"torch": torch.get_rng_state(),
                                                "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None},
                                  info)
        model_sd, optim_sd = _full_state(t.model, t.optimizer, t.fsdp)
        ema_sd = t.ema.state_dict() if t.ema is not None else None  # FSDP: gathered, a collective
        if info.is_main:
            save_training_checkpoint(last, {
                "model": model_sd, "optimizer": optim_sd,
                "scaler": t.scaler.state_dict() if t.scaler is not None else None,
                "ema": ema_sd, "state": asdict(state), "rng": rng,
                "sparse": t.sparse.state_dict() if t.sparse is not None else None,
                "config": self.meta["config"], "resolved": self.meta["resolved"],
                "config_history": self.config_history, "task": self.meta["task"],
                "model_name": self.meta["model_name"], "maskconv_version": __version__})
        D.barrier(info)
        self.saved_step, self.last_save = state.step, time.monotonic()
        return True


def evaluate_all(evaluate: Callable, t: Training, info: D.DistInfo, group=None) -> dict:
    """``evaluate`` of the trained weights and, with EMA, of their EMA (keys ``ema_*``), run on every process
    (each scores its share); the figures are the main process's, sent to every process over ``group`` (one that
    may wait long: rank 0 may score gathered COCO predictions alone), so keep-best decides the same everywhere.
    Evaluation runs on forked RNGs (torch CPU / CUDA, ``random``, NumPy): an eval loader's base seed or Pix2Seq's
    sampling draws from them, and how often a run validates must not change what it trains."""
    with forked_rngs([info.device] if info.device.type == "cuda" else []):
        return _evaluate_all(evaluate, t, info, group)


def _evaluate_all(evaluate: Callable, t: Training, info: D.DistInfo, group=None) -> dict:
    from .ema import reshard

    res = dict(D.broadcast_from_main(evaluate(t.model), info, group))  # the trained weights (model.safetensors)
    if t.fsdp:
        reshard(t.model)  # an eval forward leaves the root unit unsharded (no backward follows)
    if t.ema is not None:  # and their EMA (model_ema.safetensors), named apart
        with (t.ema.applied() if t.fsdp else nullcontext(t.ema.module)) as m:
            res.update({f"ema_{k}": v for k, v in D.broadcast_from_main(evaluate(m), info, group).items()})
    return res


def best_mode(metric: str, mode: str) -> str:
    """``run.keep_best_mode``: ``auto`` is ``min`` for a loss (a name containing 'loss'), ``max`` otherwise
    (accuracy, AP, mIoU, BLEU)."""
    return ("min" if "loss" in metric.lower() else "max") if mode == "auto" else mode


def check_keep_best(metric: str, can_evaluate: bool, ema: bool) -> None:
    """Refuse, before any work, a ``run.keep_best`` the run can never log."""
    if not metric:
        return
    if metric.startswith("ema_") and not ema:
        raise ValueError(f"run.keep_best={metric!r} names an EMA metric, but the run keeps no EMA "
                         "(set optim.ema_decay > 0, or keep the raw weights' metric)")
    if not can_evaluate and metric != "train_loss":
        raise ValueError(f"run.keep_best={metric!r}: this run has no evaluation; it logs train_loss only")


class _KeepBest:
    """``run.keep_best``: after each epoch whose row holds the metric, write the weights to ``best.safetensors``
    and their record (metric, mode, value, epoch, step) to ``best.json``, both atomically, when the value is
    finite and better than the best so far. The best so far lives in the training state, so a resumed run
    compares with it (it never replaces a better best by a worse one). ``ema_*`` metrics keep the EMA weights.
    Under FSDP the weights are gathered (a collective: every process decides the same, on the same row)."""

    def __init__(self, metric: str, mode: str, run: RunDir, t: Training, info: D.DistInfo):
        self.metric, self.mode, self.run, self.t, self.info = metric, best_mode(metric, mode), run, t, info
        # best.json can be newer than the checkpoint (written at an epoch whose checkpoint was not: a crash between
        # them, run.save_every_epochs > 1): a resumed run compares with the better of the two
        self.on_disk = D.broadcast_from_main(self._read_disk() if info.is_main else None, info) or {}

    def _read_disk(self) -> dict:
        try:
            rec = json.loads(self.run.file(RunDir.BEST_JSON).read_text())
        except (OSError, ValueError):
            return {}
        return rec if (rec.get("metric"), rec.get("mode")) == (self.metric, self.mode) else {}

    def missing(self, row: dict, evaluated: bool) -> str | None:
        """The error for a metric an evaluated row does not hold (None: present, or not an evaluated epoch)."""
        if self.metric in row or not evaluated:  # validation metrics come with evaluated epochs only
            return None
        have = [k for k, v in row.items() if k not in ("step", "epoch", "lr") and isinstance(v, (int, float))]
        return (f"run.keep_best={self.metric!r} is not a metric of this run; it logs: {', '.join(have)}"
                + ("" if len(have) > 1 else " (validation metrics need validation data)"))

    def _weights(self, ema: bool) -> dict:
        t = self.t
        if ema:
            return t.ema.full_state_dict() if t.fsdp else t.ema.module.state_dict()
        if t.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return t.model.state_dict()

    def update(self, row: dict, evaluated: bool, state: TrainState) -> None:
        import math

        from ..fileio import atomic_write
        from ..models import save_weights

        if self.metric not in row:
            return
        value = float(row[self.metric])
        if not math.isfinite(value):
            if self.info.is_main:
                print(f"warning: {self.metric}={value} at epoch {row['epoch']}: not a best", flush=True)
            return
        better = (lambda a, b: a > b) if self.mode == "max" else (lambda a, b: a < b)
        kept = [b for b in (state.best, self.on_disk) if (b.get("metric"), b.get("mode")) == (self.metric, self.mode)]
        if any(not better(value, b["value"]) for b in kept):
            return
        ema = self.metric.startswith("ema_")
        record = dict(metric=self.metric, mode=self.mode, value=value, epoch=row["epoch"], step=row["step"],
                      weights="ema" if ema else "raw")
        weights = self._weights(ema)
        if self.info.is_main:
            path = self.run.file(RunDir.BEST)
            save_weights(weights, path, metadata={"keep_best": json.dumps(record)})
            atomic_write(self.run.file(RunDir.BEST_JSON), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            print(f"best {self.metric}={value:.4g} so far (epoch {row['epoch']}): {path}", flush=True)
        state.best = self.on_disk = record


def _train(cfg, model, dataset, transform, loss_fn, task, batch_transform, evaluate, backbone, info, train_mode,
           keyed_loss, run: RunDir, ck, changes, resolved, plan: Resolved) -> FitResult:
    out, o, r = run.path, cfg.optim, cfg.run
    lr, lr_rule = plan.lr, plan.lr_rule
    if info.is_main:
        print(lr_rule + "; resolved: " + ", ".join(f"{k}={v}" for k, v in resolved.items()), flush=True)
        if lr < LOW_LR.get(task, 0):
            print(f"warning: {lr_rule} is implausibly small for {task} (below {LOW_LR[task]:g}): the run will "
                  "barely learn; at a small batch set optim.lr directly (e.g. optim.lr=1e-3)", flush=True)
    t = _setup(model, o, r, cfg.dynamic_sparsity, plan, info, task=task, backbone=backbone, fresh=ck is None, loss_fn=loss_fn,
               batch=lambda: first_batch(cfg.data.batch_size, r.seed, dataset, transform, batch_transform, info))
    state = TrainState()
    torch.manual_seed(r.seed * 1000 + info.rank)  # drop path differs between processes
    last = run.file(RunDir.LAST)
    config_history: list[dict] = []
    if ck is not None:
        state, config_history = _resume(t, ck, last, run, changes, info)
        del ck
    per_epoch_batches = plan.steps_per_epoch * max(1, o.accum_steps)
    checkpoint = _Checkpointer(t, state, last, info, dict(config=cfg.to_dict(), resolved=resolved, task=task,
                                                          model_name=cfg.model.name), config_history,
                               max(1, o.accum_steps), per_epoch_batches)
    _wrap_ddp(t, info)
    log = MetricsLog(out, info.is_main, r.logger, cfg.to_dict())
    log.truncate_after(state.step)
    history: list[dict] = []
    eval_group = D.long_wait_group(info) if evaluate is not None else None
    best = _KeepBest(r.keep_best, r.keep_best_mode, run, t, info) if r.keep_best else None

    cur_lr = lr_at(state.step, plan.total_steps, plan.warmup_steps, lr, o.min_lr)
    t_start = time.perf_counter()
    finished = state.step >= plan.total_steps  # e.g. a run.max_steps run re-run with the same --out: nothing to add
    if finished and info.is_main:
        print(f"{out} is already at step {state.step} of {plan.total_steps}: nothing to train", flush=True)
    signals = _StopSignals()
    loader = train_loader(dataset, transform, r.seed, cfg.data.batch_size, info, per_epoch_batches,
                          num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor)
    with signals:
        for epoch in range(state.epoch, state.epoch if finished else o.epochs):
            stop, cur_lr = train_one_epoch(
                t, state, epoch, loader, loss_fn, o, r, info, plan, task=task, batch_transform=batch_transform,
                train_mode=train_mode, keyed_loss=keyed_loss, log=log, checkpoint=checkpoint, signals=signals,
                t_start=t_start, cur_lr=cur_lr)
            state.loss_sum += checkpoint.watch.take_sum()
            epoch_loss = D.mean_across(state.loss_sum / max(1, state.loss_count), info)
            if stop:  # run.max_steps: summarise the partial epoch, keep a resumable checkpoint
                log.write(dict(step=state.step, epoch=epoch + state.batch_in_epoch / per_epoch_batches,
                               train_loss=epoch_loss, lr=cur_lr))
                checkpoint()
                break
            state.epoch, state.batch_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
            row = dict(step=state.step, epoch=epoch + 1, train_loss=epoch_loss, lr=cur_lr)
            evaluated = evaluate is not None and ((epoch + 1) % max(1, r.eval_every_epochs) == 0
                                                  or epoch + 1 == o.epochs)
            if evaluated:
                row.update(evaluate_all(evaluate, t, info, eval_group))
            missing = best.missing(row, evaluated) if best is not None else None
            if best is not None and missing is None:
                best.update(row, evaluated, state)
            log.write(row)
            history.append(row)
            if info.is_main:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
            if missing or (epoch + 1) % max(1, r.save_every_epochs) == 0 or epoch + 1 == o.epochs:
                checkpoint()
            if missing:  # after the epoch is logged and saved: a resume with the right name loses nothing
                raise ValueError(missing)
    unreadable = {k: v for part in D.all_gather_object(state.unreadable, info) for k, v in part.items()}
    if info.is_main and unreadable:
        print(f"{describe_unreadable(unreadable)}; each was replaced by the next readable image", flush=True)
    full = _full_state(model, t.optimizer, t.fsdp)[0] if t.fsdp else None
    ema_full = t.ema.full_state_dict() if t.fsdp and t.ema is not None else None
    log.close()  # (an interrupted run leaves its tracker run open: the resume continues it)
    return FitResult(out, state, history, model, t.ema.module if t.ema is not None and not t.fsdp else None,
                     full if info.is_main else None, run=run, ema_state_dict=ema_full if info.is_main else None)


def train_one_epoch(t: Training, state: TrainState, epoch: int, loader: DataLoader, loss_fn: Callable, o, r,
                    info: D.DistInfo, plan: Resolved, *, task: str,
                    batch_transform: Callable | None, train_mode: Callable | None, keyed_loss: bool,
                    log: MetricsLog, checkpoint: _Checkpointer, signals: _StopSignals, t_start: float,
                    cur_lr: float) -> tuple[bool, float]:
    """The optimizer steps of one epoch (from ``state.batch_in_epoch`` on a resumed one) over ``loader``
    (``train_loader``), logging every ``r.log_every_steps``, checkpointing when due; raises ``Interrupted`` on a
    stop signal, FloatingPointError on a non-finite loss. Returns (``run.max_steps`` reached, the last lr)."""
    model, ddp, optimizer, scaler, amp_ctx, sparse, ema, fsdp = (t.model, t.ddp, t.optimizer, t.scaler, t.amp_ctx,
                                                                 t.sparse, t.ema, t.fsdp)
    accum = max(1, o.accum_steps)
    total_steps, warmup, lr = plan.total_steps, plan.warmup_steps, plan.lr
    per_epoch_batches = plan.steps_per_epoch * accum  # whole accumulation cycles only: no gradient spills over
    stop = False
    # set before iter(loader): the persistent workers' first prefetches already draw from this epoch's order
    loader.sampler.epoch, loader.sampler.start_batch = epoch, state.batch_in_epoch
    (train_mode or nn.Module.train)(model)
    bar = None
    if info.is_main and r.progress:
        from tqdm import tqdm

        # the batches this epoch will run: run.max_steps may end it early
        epoch_total = per_epoch_batches
        if r.max_steps:
            epoch_total = max(0, min(per_epoch_batches, r.max_steps * accum - epoch * per_epoch_batches))
        bar = tqdm(total=epoch_total, initial=state.batch_in_epoch, desc=f"{task} epoch {epoch + 1}/"
                   f"{o.epochs}", unit="batch", dynamic_ncols=True)
    watch = checkpoint.watch
    for images, labels, skipped, indices in loader:
        state.unreadable.update(skipped)  # replaced by SeededDataset (batches stay full); counted once per file
        state.skipped_files = len(state.unreadable)
        micro = state.batch_in_epoch % accum
        if micro == 0:  # the state a checkpoint of the previous step would hold (NaN stop)
            checkpoint.boundary = (replace(state, unreadable=dict(state.unreadable)), watch.snapshot_sum(),
                                   {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None})
            watch.new_step()
        images = images.to(info.device, non_blocking=True)
        labels = D.to_device(labels, info.device)
        if batch_transform is not None:
            images, labels = batch_transform(images, labels)
        sync = micro == accum - 1
        if fsdp:
            model.set_requires_gradient_sync(sync)
        with (ddp.no_sync() if info.world > 1 and not fsdp and not sync else nullcontext()):
            with amp_ctx:
                loss = (loss_fn(ddp, images, labels, keys=(indices, epoch)) if keyed_loss
                        else loss_fn(ddp, images, labels))
            watch.update(loss, epoch * per_epoch_batches + state.batch_in_epoch)  # no host sync
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        state.loss_count += 1
        state.batch_in_epoch += 1
        if bar is not None:
            bar.update(1)
        if not sync:
            continue
        nxt = state.step + 1
        log_now = nxt % r.log_every_steps == 0
        if (log_now or (r.save_every_steps and nxt % r.save_every_steps == 0)
                or state.batch_in_epoch == per_epoch_batches or (r.max_steps and nxt >= r.max_steps)):
            bad = watch.first_non_finite(info)  # read before the update: a NaN here keeps the last step
            if bad is not None:
                checkpoint.nan_stop(bad, before_update=True)
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
        if log_now:  # same condition on every rank: the all-reduce is safe
            step_loss = watch.step_mean(accum)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{cur_lr:.2e}")
            log.write(dict(step=state.step, epoch=epoch + state.batch_in_epoch / per_epoch_batches,
                           loss=D.mean_across(step_loss, info), lr=cur_lr, time=time.perf_counter() - t_start,
                           **({"sparsity": sparse.global_sparsity} if sparse is not None else {})))
        # one collective for both: a signal on any rank stops all; a time-based save is taken together
        asked, due = D.any_true([signals.signum is not None,
                                 bool(r.save_every_minutes) and time.monotonic() - checkpoint.last_save
                                 >= r.save_every_minutes * 60], info)
        if asked:
            if bar is not None:
                bar.close()
            checkpoint()
            raise Interrupted(state.step, signals.signum or signal.SIGTERM)
        if due or (r.save_every_steps and state.step % r.save_every_steps == 0):
            checkpoint()
        if r.max_steps and state.step >= r.max_steps:
            stop = True
            break
    if bar is not None:
        bar.close()
    return stop, cur_lr


def _nan_stop(value: float, step: int, epoch: int, batch: int, late: str, last: Path, saved_step) -> None:
    """Stop with a message that names the step whose loss went non-finite and the step ``last`` holds."""
    if saved_step is not None:
        where = f"{last} holds step {saved_step}, the last checkpoint with finite weights"
    elif step > 1:  # earlier steps were finite, but the loss was read late and no checkpoint was due before it
        where = f"no checkpoint was written yet (none was due before step {step})"
    else:
        where = "no checkpoint was written (no step ended with finite weights)"
    raise FloatingPointError(
        f"non-finite loss ({value}) at step {step} (epoch {epoch + 1}, batch {batch}){late}; "
        f"{where}. Lower optim.blr, set optim.clip_grad, or check the data.")
