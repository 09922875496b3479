"""The exact model behind a run folder or a weights file, rebuilt from the run's config.

``export`` and every ``visualize`` command go through ``load_trained``: a run folder (its ``config.json`` names the
model, stem stride, channels, pooling and task) or any weights file; a weights file inside a run folder uses that
folder's config, so a model trained with ``model.stem_stride=2, model.in_chans=1`` comes back as it was trained.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, flatten, load_saved_config
from .engine.rundir import RunDir

# The final weights each task writes into its run folder (see tasks/pretrain.py, tasks/classify.py), in order of
# preference.
RUN_WEIGHTS = {"raw": (RunDir.MODEL, RunDir.ENCODER), "ema": (RunDir.MODEL_EMA,)}


def model_kwargs(cfg: Config, classifier: bool = False) -> dict:
    """``create_model`` keyword arguments of ``cfg.model`` (the stem stride under the family's own name, the width
    multiplier)."""
    from .models import architecture_kwargs

    m = cfg.model
    kw = dict(in_chans=m.in_chans, drop_path_rate=m.drop_path_rate,
              **architecture_kwargs(m.name, m.stem_stride, m.width_mult))
    if classifier:  # pooling belongs to the classifier; a pretraining encoder keeps its own
        kw["global_pool"] = m.global_pool
    return {k: v for k, v in kw.items() if v is not None}  # None: the model's own default


def probe_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier of ``model`` by the MAE linear-probe head: BatchNorm without affine, then Linear
    (std 0.01 init). Returns the head."""
    probe = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6),
                          nn.Linear(model.num_features, num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    parent, _, attr = getattr(model, "classifier", "head.fc").rpartition(".")  # 'head.fc' (ConvNeXt), 'head' (ViT)
    setattr(model.get_submodule(parent) if parent else model, attr, probe)
    return probe


@dataclass
class Trained:
    """A rebuilt model and where it came from."""

    model: nn.Module
    weights: Path | None  # None: random init (asked for explicitly)
    config: Config | None  # the run's config (None: a weights file outside any run folder)
    task: str | None  # pretrain | finetune | linprobe, from the run's config
    name: str  # registered architecture


def read_run_config(run: str | Path) -> tuple[Config, str]:
    """The ``Config`` and task saved in a run folder's ``config.json``."""
    path = Path(run) / RunDir.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a maskconv run folder (no {RunDir.CONFIG})")
    saved = json.loads(path.read_text())
    saved.pop("resolved", None)
    task = saved.pop("task", "pretrain")
    cfg = load_saved_config(flatten(saved))
    cfg.task = task
    return cfg, task


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other formats)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not a safetensors file: torch files carry no metadata we rely on
        return {}


def run_weights(run: Path, which: str = "raw") -> Path:
    """The final weights file of a run folder (``which``: raw | ema)."""
    if which not in RUN_WEIGHTS:
        raise ValueError(f"weights {which!r}: use one of {', '.join(RUN_WEIGHTS)}")
    found = next((run / f for f in RUN_WEIGHTS[which] if (run / f).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{run} has no {' or '.join(RUN_WEIGHTS[which])} (an unfinished run, or no EMA kept?)")
    return found


def load_trained(source: str | Path | None, model: str | None = None, num_classes: int | None = None,
                 weights: str = "raw", encoder: bool = False, **kwargs) -> Trained:
    """Rebuild and load the model of a run folder or weights file (``source``; None = random init of ``model``).

    ``model`` names the architecture when the file has no run config and no ``architecture`` metadata;
    ``encoder=True`` drops the classifier (``num_classes=0``); ``kwargs`` (``create_model`` arguments) override
    the run's own (``in_chans``, ``stem_stride`` ...). The class count comes from the weights' classifier rows.
    """
    from .models import checkpoint_num_classes, create_model, load_checkpoint, read_state_dict

    cfg = task = path = None
    if source is not None:
        src = Path(source)
        if src.is_dir():
            cfg, task = read_run_config(src)
            path = run_weights(src, weights)
        elif not src.is_file():
            raise FileNotFoundError(f"checkpoint not found: {src}")
        else:
            path = src
            if (src.parent / RunDir.CONFIG).is_file():  # a weights file inside its run folder
                cfg, task = read_run_config(src.parent)
    if cfg is not None:
        if model is not None and model != cfg.model.name:
            raise ValueError(f"--model {model} differs from the run's model {cfg.model.name} ({source})")
        model = cfg.model.name
        kwargs = {**model_kwargs(cfg, classifier=not encoder), **kwargs}
    elif path is not None:
        model = model or weights_metadata(path).get("architecture")
    if model is None:
        raise ValueError(f"{source} is not in a run folder and does not name its architecture: give --model")
    sd = read_state_dict(path) if path is not None else None
    linprobe = task == "linprobe" and not encoder
    if num_classes is None:
        num_classes = 0
        if sd is not None and not encoder:
            with torch.device("meta"):
                num_classes = checkpoint_num_classes(sd, create_model(model, **kwargs))
        elif sd is None:
            num_classes = 1000 if not encoder else 0
    net = create_model(model, num_classes=num_classes, **kwargs)
    if linprobe and num_classes:
        probe_head(net, num_classes)
    if sd is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an encoder-only view drops a classifier on purpose
            if encoder:
                cls = getattr(net, "classifier", "head.fc") + "."
                sd = {k: v for k, v in sd.items() if not k.startswith(cls)}
            load_checkpoint(net, sd)
    return Trained(net.eval(), path, cfg, task, model)
