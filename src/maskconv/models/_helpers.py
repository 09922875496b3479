"""Checkpoint I/O for models: read any supported layout, strict loading with readable errors, atomic saving."""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..fileio import atomic_write

__all__ = ["BackboneOnlyCheckpointError", "CheckpointError", "LoadReport",
           "load_checkpoint", "read_state_dict", "save_weights", "atomic_write"]

_WRAPPERS = ("model", "state_dict", "module", "model_state")  # official, timm/Lightning, DeepSpeed, misc
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model (the message lists what and why)."""


class BackboneOnlyCheckpointError(CheckpointError):
    """A pretraining objective was given backbone weights only (no decoder): the one case where loading them into
    ``objective.encoder`` instead is right. Any other error of a whole-objective load is not this one."""


@dataclass
class LoadReport:
    layout: str
    loaded: int
    skipped: list[str] = field(default_factory=list)  # model keys intentionally left at init (head)
    adapted_in_chans: bool = False


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[8:10] in (b"{\"", b"{ ")


def checkpoint_num_classes(sd: dict[str, torch.Tensor], model: nn.Module) -> int:
    """Rows of the classifier in state dict ``sd`` for ``model``'s family (0: a backbone-only checkpoint).
    Reads ``<model.classifier>.weight`` and a linear probe's ``<model.classifier>.1.weight`` (BN + Linear)."""
    cls = getattr(model, "classifier", "head.fc")
    w = next((sd[k] for k in (f"{cls}.weight", f"{cls}.1.weight") if k in sd), None)
    return 0 if w is None else int(w.shape[0])


def read_state_dict(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """Flat ``{name: tensor}`` from a file (safetensors or torch, never unpickling code), a weights folder
    (``local-dir:DIR``, ``hf-hub:org/name`` from the Hugging Face cache: ``models/hub.py``) or a dict.

    Unwraps ``{'model': ...}``-style containers and strips DDP/compile prefixes.
    """
    if isinstance(source, dict):
        obj = source
    else:
        from .hub import parse_source, resolve_folder, weights_file

        kind, name = parse_source(str(source))
        path = weights_file(resolve_folder(kind, name)) if kind else Path(source)  # 'local-dir:' / 'hf-hub:'
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
        try:
            if _is_safetensors(path):
                from safetensors.torch import load_file

                obj = load_file(str(path))
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "global" in msg.lower():  # weights_only unpickler met a class/function reference
                detail = next((ln.strip() for ln in msg.splitlines() if "global" in ln.lower()), "")
                raise CheckpointError(
                    f"refusing to load {path}: it contains pickled Python objects, which could run code "
                    f"(only tensors and plain containers are accepted; {detail})"
                ) from None
            raise CheckpointError(f"could not read {path} as a safetensors or torch checkpoint "
                                  f"(corrupt or truncated?): {msg.splitlines()[-1][:200]}") from None
        except Exception as e:  # corrupt / truncated / not a checkpoint at all
            raise CheckpointError(
                f"could not read {path} as a safetensors or torch checkpoint (corrupt or truncated?): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    for _ in range(3):  # nested containers, e.g. {'model': {'state_dict': ...}}
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "no state dict of tensors found in the checkpoint "
            f"(looked at the top level and under {', '.join(repr(k) for k in _WRAPPERS)})"
        )
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt a stem conv weight (O, I, kh, kw) to ``in_chans`` input channels as timm does: sum for 1 channel
    from RGB, otherwise repeat the channels cyclically and rescale so activations keep their magnitude."""
    cin = weight.shape[1]
    if in_chans == cin:
        return weight
    if in_chans == 1 and cin == 3:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // cin)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (cin / in_chans)


def _fmt(keys, n=8) -> str:
    keys = list(keys)
    more = f" … (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | dict,
    strict: bool = True,
    drop_mismatched_head: bool = False,
    filter_fn: Callable[[dict, nn.Module], tuple[dict, str]] | None = None,
    allow_nonfinite: bool = False,
    allow_non_float: bool = False,
) -> LoadReport:
    """Load weights in any layout the model family reads (ours = timm, official FB incl. FCMAE/MinkowskiEngine,
    HF transformers) into ``model``; the layout is detected by the family's checkpoint filter (registered with
    ``register_checkpoint_filter``; ``filter_fn`` overrides it, as timm's ``load_checkpoint(filter_fn=...)``).

    Strict by default: any missing, unexpected or mis-shaped key raises ``CheckpointError`` listing them, so a
    GRN can never silently stay at its zero init. A filter reshapes only where its layout is known to store a
    tensor differently, so a tensor with the right element count but another shape (a transposed classifier) is
    an error naming the key and both shapes. Two deliberate exceptions, each reported with a warning:
    a backbone-only checkpoint (no ``head.*`` at all, e.g. FCMAE) leaves the head at init, and with
    ``drop_mismatched_head`` a classifier of another class count is dropped (fine-tuning).
    A stem made for another channel count is adapted to the model's ``in_chans``.
    Non-finite values and integer/bool tensors for float parameters are errors unless ``allow_nonfinite`` /
    ``allow_non_float`` say they are wanted.
    """
    sd = read_state_dict(source)
    if filter_fn is None:
        from ._registry import checkpoint_filter_for

        filter_fn = checkpoint_filter_for(model)
    layout = "native"
    if filter_fn is not None:
        try:
            sd, layout = filter_fn(sd, model)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    target = model.state_dict()
    report = LoadReport(layout=layout, loaded=0)

    first = getattr(model, "first_conv", None)
    wkey = f"{first}.weight" if first else None
    if wkey in sd and wkey in target:
        w, t = sd[wkey], target[wkey]
        if w.ndim == 4 and w.shape[1] != t.shape[1] and (w.shape[0], *w.shape[2:]) == (t.shape[0], *t.shape[2:]):
            sd[wkey] = adapt_input_conv(t.shape[1], w)
            report.adapted_in_chans = True

    cls = getattr(model, "classifier", "head.fc") + "."  # classifier key prefix (timm's pretrained_cfg name)
    had_head = any(k.startswith(cls) for k in sd)  # no classifier = a backbone-only checkpoint
    if drop_mismatched_head:
        for k in [k for k in sd if k.startswith(cls)]:
            # another class count: only dim 0 differs. Any other shape (e.g. a transposed classifier) is malformed
            # and stays in the state dict, so the shape check below refuses it.
            other_count = k in target and sd[k].shape[1:] == target[k].shape[1:] and sd[k].shape != target[k].shape
            if k not in target or other_count:
                warnings.warn(f"checkpoint classifier {k} {tuple(sd[k].shape)} does not fit the model: left at init")
                del sd[k]
                report.skipped.append(k)
        absent = [k for k in target if k.startswith(cls) and k not in sd and k not in report.skipped]
        if absent:  # encoder-only checkpoint (num_classes=0) into a classifier
            warnings.warn(f"checkpoint has no classifier ({_fmt(absent)}): left at init")
            report.skipped += absent

    missing = [k for k in target if k not in sd and k not in report.skipped]
    unexpected = [k for k in sd if k not in target]
    shape_bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                 for k in sd if k in target and sd[k].shape != target[k].shape]
    if not had_head and any(k.startswith("head.") for k in missing):  # e.g. FCMAE encoders (with or w/o head.norm)
        head = [k for k in missing if k.startswith("head.")]
        warnings.warn(f"backbone-only checkpoint: {_fmt(head)} left at init")
        report.skipped += head
        missing = [k for k in missing if k not in head]
    if shape_bad:
        raise CheckpointError(f"checkpoint ({layout} layout) does not fit the model: shape mismatch for "
                              f"{_fmt(shape_bad)}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_fmt(unexpected)}")
        raise CheckpointError(f"checkpoint ({layout} layout) does not fit the model: " + "; ".join(parts))
    load = {k: sd[k] for k in target if k in sd}  # in the model's order, so errors list keys as the model does
    _check_values(load, target, layout, allow_nonfinite, allow_non_float)
    model.load_state_dict(load, strict=False)
    report.loaded = len(load)
    return report


def _check_values(sd: dict, target: dict, layout: str, allow_nonfinite: bool, allow_non_float: bool) -> None:
    """Refuse integer/bool tensors for float parameters (``load_state_dict`` would cast them silently) and NaN/Inf
    values, naming the keys; each has its opt-out."""
    if not allow_non_float:
        bad = [f"{k} ({v.dtype})" for k, v in sd.items()
               if target[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
        if bad:
            raise CheckpointError(f"checkpoint ({layout} layout) stores non-float values for float parameters: "
                                  f"{_fmt(bad)} (pass allow_non_float=True to cast them anyway)")
    if not allow_nonfinite:
        bad = []
        for k, v in sd.items():
            if v.is_floating_point() or v.is_complex():
                n = v.numel() - int(torch.isfinite(v).sum())
                if n:
                    bad.append(f"{k} ({n} of {v.numel()})")
        if bad:
            raise CheckpointError(f"checkpoint ({layout} layout) has NaN/Inf values in {len(bad)} tensor(s): "
                                  f"{_fmt(bad)} (pass allow_nonfinite=True to load them anyway)")


def save_weights(model: nn.Module | dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict atomically: safetensors (default, by suffix ``.safetensors``) or torch (``.pt/.pth``).

    The keys are timm's, so the file loads strict into timm's same-named model.
    """
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") if isinstance(model, nn.Module) else None
    if arch:
        meta["architecture"] = arch
    meta.update(metadata or {})
    if Path(path).suffix in (".pt", ".pth", ".bin"):
        return atomic_write(path, lambda tmp: torch.save({"state_dict": sd, "metadata": meta}, tmp))
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
