"""A run folder and what it guarantees: one owner (an exclusive lock), append-only provenance (the config a run
started with is never rewritten; a change on resume is refused, or recorded with the step it took effect), no
stale temporary files. ``RunDir`` names every file a run folder holds.

Why not the ``filelock`` package: it truncates the lock file on every attempt, so a refused second process could
not read (and name) the owner; the lock here is the same ``fcntl.flock`` with the owner's pid/host kept.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from ..config import flatten as config_flatten, renamed_key

# Config keys that do not change what is trained: they may differ on resume without being recorded.
NOT_TRAINING_RELEVANT = frozenset({
    "run.out", "run.device", "run.progress", "run.tensorboard", "run.logger", "run.log_every_steps", "run.save_every_epochs",
    "run.save_every_steps", "run.save_every_minutes", "run.eval_every_epochs", "run.allow_config_change",
    "run.dist_timeout_minutes", "run.keep_best", "run.keep_best_mode", "data.num_workers", "data.prefetch_factor",
    "resolved.world_size", "resolved.device",
    "task"})  # the checkpoint's own task is compared (loop._open_run); config.json's was 'pretrain' for every
# non-classification command before it named the command that ran


class RunFolderBusy(ValueError):
    """Another live process owns the run folder (the message names it)."""


class ConfigChanged(ValueError):
    """A resume would train with other settings than the run's record (the message lists them)."""


class RunDir:
    """The files of one run folder. ``lock()`` before writing anything; ``release()`` when the run's last
    file is written (a crash releases it too: the kernel drops a dead process's ``flock``)."""

    # Every file name of a run folder, named here only.
    LOCK = ".lock"
    CONFIG = "config.json"  # the config + resolved values the run started with; written once
    HISTORY = "config_history.jsonl"  # one row per accepted change: {"step", "changes", "time"}
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tb"  # TensorBoard event files (run.logger=tensorboard)
    TRACKER_IDS = "tracker_ids.json"  # W&B / MLflow run ids of this folder, so a resume continues them (run.logger)
    LAST = "last.pt"  # the training checkpoint (engine/checkpoint.py)
    CLASSES = "classes.json"  # a classifier's class names, in label order
    MODEL = "model.safetensors"  # the trained weights (finetune, linprobe, pix2seq)
    MODEL_EMA = "model_ema.safetensors"  # their EMA (optim.ema_decay > 0)
    BEST = "best.safetensors"  # run.keep_best: the weights of the best evaluated epoch so far (raw or EMA)
    BEST_JSON = "best.json"  # ... and its record: metric, mode, value, epoch, step, weights (raw / ema)
    ENCODER = "encoder.safetensors"  # a pretraining run's encoder, strict-loads into create_model / timm
    OBJECTIVE = "objective.safetensors"  # a pretraining run's whole objective (encoder + decoder + config)
    PIX2SEQ = "pix2seq.json"  # Pix2Seq options and classes
    DENSE = "dense.json"  # detect / segment options, classes and backbone (heads/task.py)
    EVAL = "eval"  # eval/<split>: results of maskconv eval
    EVAL_JSON = "eval.json"  # inside an eval folder: the figures of one evaluation
    PREDICTIONS = "predictions.json"  # COCO-format predictions of an evaluation (detect, pix2seq)
    CURVES = "curves.png"  # maskconv visualize curves, by default

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    def lock(self) -> None:
        """Take the folder's exclusive lock or raise RunFolderBusy naming the live owner. A lock file whose
        owner died (no ``flock`` held, pid/host still written) is stale: taken over with a note."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file(self.LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"run folder {self.path} is in use by {owner}; wait for it to end or choose "
                                    "another run.out") from None
            raise
        stale = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if stale:
            print(f"note: {self.path} was left locked by {stale}, which is no longer running: taking it over",
                  flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file (an empty file is a clean end) and drop the lock."""
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def remove_stale_tmp(self) -> int:
        """Delete temporary files of interrupted atomic writes (``.<name>.<random>.tmp``); returns bytes freed."""
        freed = 0
        for p in self.path.glob(".*.tmp"):
            if p.is_file():
                freed += p.stat().st_size
                p.unlink()
        if freed:
            print(f"removed stale temporary files of an interrupted checkpoint write in {self.path} "
                  f"({freed / 1e6:.1f} MB)", flush=True)
        return freed

    def history(self) -> list[dict]:
        p = self.file(self.HISTORY)
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []

    def append_history(self, step: int, changes: list[tuple[str, object, object]]) -> dict:
        row = {"step": step, "changes": {k: [a, b] for k, a, b in changes}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.file(self.HISTORY), "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def flatten(d: dict) -> dict:
    """``config.flatten`` with JSON-normalised values (tuples become lists), as they read back from a file, and
    renamed keys under their current names (a run recorded before a rename compares with its resume)."""
    return {renamed_key(k) or k: json.loads(json.dumps(v)) for k, v in config_flatten(d).items()}


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """Training-relevant differences ``(key, old, new)`` between two ``{config..., "resolved": {...}}`` records.
    Keys one record lacks (written by an older version) are not compared."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if k not in NOT_TRAINING_RELEVANT and a[k] != b[k]]


def format_changes(changes: list[tuple[str, object, object]]) -> str:
    return "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)


def check_resume(run: RunDir, step: int, old: dict, new: dict, allow: bool) -> list[tuple[str, object, object]]:
    """Refuse (ConfigChanged) a resume whose training-relevant settings differ from the checkpoint's, unless
    ``allow``; returns the changes (to record)."""
    changes = config_changes(old, new)
    if changes and not allow:
        raise ConfigChanged(f"refusing to resume {run.path} (step {step}) with other training settings: "
                            f"{format_changes(changes)}. Re-run with the run's settings, choose another run.out, or "
                            "pass --allow-config-change (run.allow_config_change=true) to record the change")
    return changes


def data_fingerprint(dataset) -> str:
    """Cheap identity of the training data: file count + hash of (name, size) of every file for a folder
    dataset; the dataset's kind and length otherwise (named datasets are fixed)."""
    base = dataset
    while hasattr(base, "dataset") and not hasattr(base, "samples"):  # torch Subset (labels_per_class)
        base = base.dataset
    if hasattr(base, "fingerprint"):  # e.g. ShardDataset: (shard, member, size) of every sample
        return base.fingerprint()
    samples = getattr(base, "samples", None)
    if samples and isinstance(samples[0], (tuple, list)) and isinstance(samples[0][0], (str, os.PathLike)):
        paths = [Path(s[0]) for s in samples]
        root = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
        h = hashlib.sha256()
        for p in paths:
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            h.update(f"{p.relative_to(root)}\0{size}\n".encode())
        return f"{len(paths)} files, sha256 {h.hexdigest()[:16]}"
    return f"{type(base).__name__}, {len(dataset)} samples"

