"""Training checkpoints: everything needed to resume exactly, written atomically (temp file + rename)."""
from __future__ import annotations

import errno
from pathlib import Path

import torch

from ..fileio import atomic_write
from ..models import CheckpointError

from .rundir import RunDir

LAST = RunDir.LAST  # kept importable from here


def save_training_checkpoint(path: str | Path, payload: dict) -> Path:
    """``payload``: model / optimizer / scaler / ema state dicts, train state, RNG states, resolved config.
    A full disk is one line (CheckpointError) and leaves the previous file as it was (the write is atomic)."""
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        chain, cur = [], e
        while cur is not None and len(chain) < 10:
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        if any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in chain):
            raise CheckpointError(f"no space left on the device writing {path}; the previous {path.name} is kept "
                                  "unchanged: free some space and re-run the same command to resume") from None
        raise


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_training_checkpoint``; never unpickles code (weights_only)."""
    import pickle

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to resume from {path}: it holds pickled objects that could run code "
                              f"({str(e).splitlines()[-1][:200]})") from None
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: unreadable ({type(e).__name__}: {e}); "
                              "move it away to start over") from None
    for key in ("model", "optimizer", "state", "config"):
        if key not in ck:
            raise CheckpointError(f"{path} is not a maskconv training checkpoint (no {key!r})")
    return ck


def load_run_weights(run: str | Path) -> dict:
    """A task run folder's trained weights: ``model.safetensors`` when the run finished, else the ``model`` of its
    ``last.pt`` (an unfinished run). One reader for every task room (pix2seq, detect, segment)."""
    run = Path(run)
    if (run / RunDir.MODEL).is_file():
        from safetensors.torch import load_file

        return load_file(run / RunDir.MODEL)
    if (run / RunDir.LAST).is_file():
        return load_training_checkpoint(run / RunDir.LAST)["model"]
    raise FileNotFoundError(f"{run} holds neither {RunDir.MODEL} nor {RunDir.LAST}")
