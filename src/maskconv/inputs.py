"""Every check of a training run's inputs, done before any work and before any file is written.

``check_inputs(cfg)`` is the one place: ``run_pretrain`` / ``run_finetune`` / ``run_linprobe`` call it first (so the
CLI and the Python API refuse bad input alike, leaving no run folder behind), and it hands back the data sets it
built, so nothing is listed twice.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .config import Config, ConfigError
from .engine.rundir import RunDir
from .data.build import NAMED, build_dataset, has_splits, normalization
from .data.datasets import SeededDataset, Unreadable, describe_unreadable, image_folder_of


@dataclass
class Inputs:
    """What a checked run trains on. ``notes``: facts the user should see (printed by the main process)."""
    train: Dataset
    val: Dataset | None = None  # labeled tasks with a validation split
    classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def print_notes(self, is_main: bool = True) -> None:
        """Print the notes (on the main process only: one copy per run, not per process)."""
        if is_main:
            for note in self.notes:
                print(f"note: {note}", flush=True)


def check_inputs(cfg: Config, task: str | None = None) -> Inputs:
    """Raise a one-line error (ConfigError / ValueError / FileNotFoundError) for input the run cannot use, else
    return its data sets. ``task``: pretrain | finetune | linprobe (default ``cfg.task``).

    Checks: the data is named (no silent synthetic default); ``run.out`` holds no run of another task or model;
    the image size suits the model (its stride, via a forward on the meta device: no memory, no time);
    ``data.mean`` / ``data.std`` have one value per input channel; a labeled
    task has >= 2 classes; the first files of every split can be read. Notes: the validation split (held out, or
    none), loose files beside class folders, skipped non-regular files."""
    d, task = cfg.data, task or cfg.task
    cfg.task = task  # what config.json records is the task that ran
    if not d.path:
        raise ConfigError(f"{task} needs data: pass --data <image folder> or a named dataset ({', '.join(NAMED)})")
    _check_out(cfg, task)
    _check_size(cfg, task)
    normalization(d, cfg.model.in_chans)  # data.mean / data.std: one value per channel the model takes
    labeled = task != "pretrain"
    train = build_dataset(d, cfg.model.in_chans, "train", labeled=labeled, seed=cfg.run.seed)
    inputs = Inputs(train)
    folder = image_folder_of(train)
    if labeled:
        inputs.classes = list(getattr(train, "classes", []))
        where = folder.root if folder is not None else d.path
        if len(inputs.classes) < 2:
            raise ValueError(f"{task} needs at least 2 classes; {where} has {len(inputs.classes)} class folder(s) "
                             f"({', '.join(inputs.classes) or 'none'}): put each class's images in its own sub-folder")
        if folder is not None and folder.loose:
            names = ", ".join(p.name for p in folder.loose[:5]) + (", ..." if len(folder.loose) > 5 else "")
            inputs.notes.append(f"{len(folder.loose)} image file(s) directly in {where} belong to no class and are "
                                f"not used ({names})")
        split_dirs = d.path not in NAMED and has_splits(d.path)
        if d.path in NAMED or split_dirs or d.val_fraction > 0:
            inputs.val = build_dataset(d, cfg.model.in_chans, "val", labeled=True, classes=inputs.classes)
            if not split_dirs and d.path not in NAMED:
                inputs.notes.append(f"{where}: {len(inputs.val)} images ({d.val_fraction:g} of each class) held out "
                                    f"for validation, {len(train)} for training")
        else:
            inputs.notes.append(f"{where} has no train/ and val/ sub-folders: training on all {len(train)} images "
                                f"of {len(inputs.classes)} classes, with no validation (no accuracy is measured); "
                                f"set data.val_fraction=0.1 to hold out 10% of each class, or split them as "
                                f"{where}/train/<class> and {where}/val/<class>")
    seen = []
    for name, ds in (("training", train), ("validation", inputs.val)):
        if ds is None:
            continue
        _check_readable(ds, name)
        f = image_folder_of(ds)
        if f is not None and f.skipped and f.root not in seen:  # a held-out val shares its folder with training
            inputs.notes.append(f"{name} data: {describe_unreadable(f.skipped)}")
            seen.append(f.root)
    return inputs


def _check_out(cfg: Config, task: str) -> None:
    """``run.out`` may hold this run (resume) but not another task's or model's run: refuse before a file of the
    new run (config.json, classes.json) lands in it."""
    import json

    prev = Path(cfg.run.out) / RunDir.CONFIG
    try:
        saved = json.loads(prev.read_text()) if prev.is_file() else {}
    except ValueError:  # unreadable: resume reports it
        return
    was = (saved.get("task"), (saved.get("model") or {}).get("name"))
    if saved and was != (task, cfg.model.name):
        raise ConfigError(f"run.out={cfg.run.out} holds a {was[0]} run of {was[1]}; this is a {task} run of "
                          f"{cfg.model.name}: choose another --out")


def _check_size(cfg: Config, task: str) -> None:
    """``data.img_size`` must suit the model: pretraining needs a multiple of the objective's patch (the encoder's
    total stride); a classifier says itself what it refuses (a forward on the meta device)."""
    from .models import create_model
    from .rebuild import model_kwargs

    s, c = cfg.data.img_size, cfg.model.in_chans
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # construction notes are printed when the real model is built
        if task == "pretrain":
            from .pretrain import create_objective
            from .pretrain.masking import num_visible

            obj = create_objective(cfg.objective.name, model=cfg.model.name, model_kwargs=model_kwargs(cfg))
            if s % obj.patch_size:
                p = obj.patch_size
                raise ConfigError(f"data.img_size={s} is not a multiple of the patch size {p} that {cfg.objective.name} "
                                  f"masks ({cfg.model.name}'s total stride): use e.g. {max(1, round(s / p)) * p}")
            g = s // obj.patch_size
            if num_visible(g * g, obj.mask_ratio) < 1:  # found here, before the run folder is written
                raise ConfigError(f"data.img_size={s}: a {g}x{g} grid of {obj.patch_size}-px patches at mask ratio "
                                  f"{obj.mask_ratio} leaves no patch visible; use larger images or a lower "
                                  "objective.mask_ratio")
            return
        net = create_model(cfg.model.name, num_classes=2, **model_kwargs(cfg, classifier=True))
        try:
            net(torch.empty(1, c, s, s))
        except ValueError as e:
            raise ConfigError(f"data.img_size={s} does not suit {cfg.model.name}: {e}") from None


def _check_readable(ds: Dataset, name: str) -> None:
    """Training replaces an unreadable file by the next readable one, up to ``MAX_CONSECUTIVE_BAD`` in a row; make
    sure the data is not unreadable from its very start (e.g. a folder of only broken files)."""
    bad: list[Unreadable] = []
    n = min(len(ds), SeededDataset.MAX_CONSECUTIVE_BAD + 1)
    head = ds.head(n) if hasattr(ds, "head") else (ds[i] for i in range(n))  # a stream: its first samples
    for i, sample in enumerate(head):
        if not isinstance(sample, Unreadable) and sample is not None:
            return
        bad.append(sample or Unreadable(f"#{i}", "unreadable"))
    what = f"none of the {n} image files" if n == len(ds) else f"the first {n} image files"
    raise ValueError(f"{what} of the {name} data can be read ({describe_unreadable(bad, 3)}): is this an image dataset?")
