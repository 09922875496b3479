"""``maskconv finetune | linprobe | eval``: supervised classification on a backbone, and its evaluation."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..commands import Command, training_command
from ..config import Config, DataCfg, flatten
from ..data.build import TimmMixup, build_dataset, build_mixup, build_transform
from ..data.datasets import collate_skip, image_folder_of
from ..engine import dist as D
from ..engine.loop import FitResult, fit
from ..engine.rundir import RunDir
from ..inputs import check_inputs
from ..models import checkpoint_num_classes, create_model, load_checkpoint, save_weights
from ..rebuild import model_kwargs, probe_head


def eval_loader(cfg: Config, ds, batch_size: int | None = None, info: D.DistInfo | None = None) -> DataLoader:
    """Eval-transformed loader of ``ds``; unreadable files are dropped, not replaced, so no image counts twice.
    ``info``: this process's share only (``dist.eval_share``: no image padded, none dropped)."""
    from torch.utils.data import Subset

    from ..data.datasets import SeededDataset

    tf = build_transform(cfg.data, cfg.model.in_chans, train=False)
    data = SeededDataset(ds, tf, replace_bad=False)
    if info is not None and info.world > 1:
        data = Subset(data, D.eval_share(len(data), info))
    return DataLoader(data, batch_size=batch_size or cfg.data.batch_size, num_workers=cfg.data.num_workers,
                      collate_fn=collate_skip)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, num_classes: int, device=None,
                        progress: bool = True, info: D.DistInfo | None = None, lockstep: bool = False) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy (%), per-class accuracy, the confusion
    matrix (rows = truth), the number of images and the unreadable files met (``{path: reason}``)."""
    return evaluate_classifiers({"": model}, loader, num_classes, device, progress, info, lockstep)[""]


@torch.no_grad()
def evaluate_classifiers(models: dict[str, nn.Module], loader: DataLoader, num_classes: int, device=None,
                         progress: bool = True, info: D.DistInfo | None = None,
                         lockstep: bool = False) -> dict[str, dict]:
    """``evaluate_classifier`` of several models in one pass over the data (each image decoded once).
    Raises ValueError when no image could be read, or when a model's output is not finite.

    Distributed (``info`` with several processes, every one calling this with its share, ``eval_loader``): the
    confusion matrices, top-5 counts, image counts and unreadable files are summed over the processes, so every
    process returns exactly the one-process figures. ``lockstep`` (FSDP-sharded models): every process runs the
    same number of forwards (``dist.in_lockstep``), a process without images this step a dummy batch."""
    from tqdm import tqdm

    info = info or D.DistInfo()
    for m in models.values():
        m.eval()
    device = device or next(next(iter(models.values())).parameters()).device
    conf = {name: torch.zeros(num_classes, num_classes, dtype=torch.long) for name in models}
    top5 = {name: torch.zeros((), dtype=torch.long) for name in models}
    n, unreadable, error = 0, {}, None
    k = 5 if num_classes > 5 else 0  # top-5 of 5 or fewer classes is always 100%: not reported
    # disable=None: tqdm shows the bar on a terminal only, never floods a log file
    batches = tqdm(loader, desc="eval", unit="batch", leave=False, disable=(not progress or not info.is_main) or None)
    if lockstep and info.world > 1:
        steps = D.in_lockstep(batches, info, lambda b: tuple(b[0].shape[1:]) if b[0] is not None else None)
    else:
        steps = ((b, tuple(b[0].shape[1:]) if b[0] is not None else None) for b in batches)
    for batch, shape in steps:
        images, labels, bad = batch if batch is not None else (None, None, {})
        unreadable.update(bad)
        if shape is None:  # every file of this step's batches was unreadable: no process runs the model
            continue
        if images is None or error is not None:  # lockstep: a forward all the same, its output discarded
            for m in models.values():
                m(torch.zeros(1, *shape, device=device))
            continue
        if labels.max() >= num_classes or labels.min() < 0:
            # raised below on every process together (a lone raise would leave the others waiting)
            error = (f"labels {labels.min().item()}..{labels.max().item()} outside the model's "
                     f"{num_classes} classes")
        x = images.to(device)
        for name, m in models.items():
            logits = m(x).float().cpu()
            if error is not None:
                continue
            if not torch.isfinite(logits).all():  # an argmax of NaN is a number we would not defend
                error = (f"{name + ' ' if name else ''}model gives non-finite outputs (a batch of "
                         f"{len(labels)} images): the weights are broken or overflow")
                continue
            pred = logits.argmax(1)
            conf[name] += torch.bincount(labels * num_classes + pred,
                                         minlength=num_classes**2).view(num_classes, num_classes)
            if k:
                top5[name] += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        n += len(labels)
    folder = image_folder_of(loader.dataset)
    if info.is_main:  # the folder's own skipped files (e.g. FIFOs, never listed): the same on every process
        unreadable.update({u.path: u.reason for u in (folder.skipped if folder else [])})
    if info.world > 1:
        parts = D.all_gather_object((error, unreadable), info)
        error = next((e for e, _ in parts if e is not None), None)
        unreadable = {p: r for _, part in parts for p, r in part.items()}
        names = list(models)
        # one all-reduce of every count: images, top-5 hits, confusion matrices
        flat = torch.cat([torch.tensor([n])] + [top5[x].view(1) for x in names] + [conf[x].flatten() for x in names])
        flat = D.sum_across(flat, info)
        n = int(flat[0])
        for i, x in enumerate(names):
            top5[x] = flat[1 + i]
            off = 1 + len(names) + i * num_classes**2
            conf[x] = flat[off:off + num_classes**2].view(num_classes, num_classes)
    if error is not None:
        raise ValueError(error)
    if n == 0:
        from ..data.datasets import describe_unreadable

        raise ValueError("no readable image to evaluate on" + (f" ({describe_unreadable(unreadable)})"
                                                               if unreadable else ""))
    out = {}
    for name, c in conf.items():
        out[name] = dict(val_top1=c.diag().sum().item() / n * 100,
                         **({"val_top5": top5[name].item() / n * 100} if k else {}),
                         # a class with no image here has no accuracy: None (n/a), never 0.0
                         val_per_class=[None if int(t) == 0 else float(d) / int(t) * 100
                                        for d, t in zip(c.diag().tolist(), c.sum(1).tolist())],
                         val_confusion=c.tolist(), val_images=n, val_unreadable=dict(unreadable))
    return out


def _classifier(cfg: Config, num_classes: int, linprobe: bool = False) -> nn.Module:
    kw = model_kwargs(cfg, classifier=True)
    if linprobe:
        kw["drop_path_rate"] = 0.0  # the frozen backbone must give the same features every time
    model = create_model(cfg.model.name, num_classes=num_classes, head_init_scale=cfg.model.head_init_scale, **kw)
    if cfg.model.init:
        with warnings.catch_warnings():  # what they say (head left at init) is in the one line below
            warnings.filterwarnings("ignore", message=".*left at init", category=UserWarning)
            rep = load_checkpoint(model, cfg.model.init, drop_mismatched_head=True)
        print(f"init from {cfg.model.init} ({rep.layout} layout; left at init: {', '.join(rep.skipped) or 'none'})")
    return model


def train_transform(cfg: Config, linprobe: bool):
    """Fine-tuning's augmentation as configured; the linear probe's is MAE's (main_linprobe.py): random resized
    crop + flip, nothing stronger."""
    return build_transform(cfg.data, cfg.model.in_chans, train=True, weak=linprobe)


def _supervised(cfg: Config, linprobe: bool) -> FitResult:
    inputs = check_inputs(cfg, "linprobe" if linprobe else "finetune")  # before any work or file
    d = cfg.data
    if not linprobe and d.augment_lib == "timm" and (d.mixup > 0 or d.cutmix > 0) and d.batch_size % 2:
        raise ValueError(f"data.batch_size={d.batch_size}: timm's Mixup (data.augment_lib=timm with data.mixup / "
                         "data.cutmix) mixes each image with its mirror in the batch and needs an even batch")
    ds, classes = inputs.train, inputs.classes
    n = len(classes)
    # built before any work: a missing timm or a policy string timm cannot parse is one line here
    batch_tf = None if linprobe else build_mixup(d, n)
    tf = train_transform(cfg, linprobe)
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    inputs.print_notes(info.is_main)
    torch.manual_seed(cfg.run.seed)
    model = _classifier(cfg, n, linprobe)
    train_mode = None
    if linprobe:  # MAE protocol: frozen backbone, BatchNorm (no affine) + linear head
        model.requires_grad_(False)
        probe = probe_head(model, n)

        def train_mode(m: nn.Module) -> None:  # frozen means frozen: backbone BatchNorm stats / dropout stay eval
            m.eval()
            probe.train()
    # every process scores its share of the validation set (FSDP: all must run each forward together)
    val = eval_loader(cfg, inputs.val, info=info) if inputs.val is not None else None
    lockstep = cfg.run.fsdp and info.world > 1
    # timm's Mixup folds the label smoothing into its soft targets: cross-entropy on them is the official
    # SoftTargetCrossEntropy (sum of -target * log_softmax, batch mean), with no smoothing on top
    smoothing = 0.0 if isinstance(batch_tf, TimmMixup) else d.label_smoothing

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y, label_smoothing=smoothing)

    def evaluate(m):
        if val is None:
            return {}
        r = evaluate_classifier(m, val, n, info.device, progress=cfg.run.progress, info=info, lockstep=lockstep)
        (train_mode or nn.Module.train)(m)
        return {k: v for k, v in r.items() if k in ("val_top1", "val_top5")}

    task = "linprobe" if linprobe else "finetune"
    # no validation data: no evaluation (run.keep_best=val_* is refused before any work)
    res = fit(cfg, model, ds, tf, loss_fn, task=task, batch_transform=batch_tf,
              evaluate=evaluate if inputs.val is not None else None,
              backbone=model if cfg.optim.layer_decay != 1.0 else None, info=info, train_mode=train_mode,
              files={RunDir.CLASSES: json.dumps(classes)})  # eval numbers classes the same way
    if info.is_main:
        meta = {"num_classes": str(n), "classes": json.dumps(classes)}
        save_weights(res.state_dict if res.state_dict is not None else model, res.out / RunDir.MODEL,
                     metadata={"architecture": cfg.model.name, **meta})
        ema = res.ema_state_dict if res.ema_state_dict is not None else res.ema  # FSDP: gathered by fit
        if ema is not None:
            save_weights(ema, res.out / RunDir.MODEL_EMA, metadata=meta)
    return res


def run_finetune(cfg: Config) -> FitResult:
    """Supervised fine-tuning (layer decay, EMA, MixUp/CutMix, label smoothing as configured)."""
    res = _supervised(cfg, linprobe=False)
    res.run.release()  # the weights files are written: the run folder is free
    return res


def run_linprobe(cfg: Config) -> FitResult:
    """Linear probe: frozen backbone, BatchNorm + linear classifier trained."""
    res = _supervised(cfg, linprobe=True)
    res.run.release()
    return res


WEIGHTS = ("both", "raw", "ema")


def _kept_weights(f: Path) -> str | None:
    """'ema' / 'raw' for a ``best.safetensors`` (run.keep_best records which weights it kept), else None."""
    from safetensors import safe_open

    if f.suffix != ".safetensors":
        return None
    with safe_open(str(f), "pt") as h:
        rec = (h.metadata() or {}).get("keep_best")
    return json.loads(rec).get("weights") if rec else None


@dataclass
class EvalSource:
    """What ``run_eval`` scores: the run's config, its weights by kind ('raw' / 'ema'), class names, task."""
    cfg: Config
    task: str  # finetune | linprobe
    weights: dict[str, dict]  # {'raw': state dict, 'ema': state dict}, whichever the source holds
    files: dict[str, str]  # where each came from, for the printout
    classes: list[str] | None
    home: Path  # the run folder (or the weights file's folder): eval/<split> goes under it
    has_config: bool  # the run's own config (and data) is known


def _pct(v: float | None) -> str:
    """A per-class accuracy cell: ``n/a`` for a class with no image in the evaluated split."""
    return f"{'n/a':>10}" if v is None else f"{v:>9.2f}%"


def _run_config(saved: dict, model: str | None, overrides: dict) -> Config:
    from ..config import load_saved_config

    base = {k: v for k, v in flatten(saved).items() if k != "task" and not k.startswith("resolved.")}
    if model:
        base["model.name"] = model
    return load_saved_config({**base, **{k: v for k, v in overrides.items() if v is not None}})


def load_eval_source(checkpoint: str | Path, model: str | None = None, **overrides) -> EvalSource:
    """Read a fine-tune / linear-probe run for evaluation: a run folder (its ``last.pt``, else its
    ``model.safetensors`` / ``model_ema.safetensors`` with ``config.json``), a ``last.pt``, or any weights file
    (``model`` and ``overrides`` such as ``{'model.in_chans': 1}`` name the architecture when no ``config.json``
    sits beside it). Non-finite weights are refused."""
    from safetensors import safe_open

    from ..engine.checkpoint import load_training_checkpoint
    from ..models import CheckpointError, read_state_dict

    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such run folder or weights file")
    names = (RunDir.MODEL, RunDir.MODEL_EMA)
    if src.is_dir():
        if not (src / RunDir.LAST).is_file() and not any((src / f).is_file() for f in names):
            raise CheckpointError(f"{src} holds no checkpoint to evaluate (no {RunDir.LAST}, {' or '.join(names)}): "
                                  "is it a finished finetune / linprobe run folder?")
    home = src if src.is_dir() else src.parent
    weights, files, cfg, task = {}, {}, None, None
    if (src.is_dir() and (src / RunDir.LAST).is_file()) or src.name == RunDir.LAST:
        path = src / RunDir.LAST if src.is_dir() else src
        ck = load_training_checkpoint(path)
        task, cfg = ck.get("task"), _run_config(ck["config"], model, overrides)
        weights["raw"], files["raw"] = ck["model"], f"{path}, 'model'"
        if ck.get("ema") is not None:  # AveragedModel state: the model's keys under 'module.'
            weights["ema"] = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
            files["ema"] = f"{path}, 'ema'"
    else:
        chosen = [src / f for f in names if (src / f).is_file()] if src.is_dir() else [src]
        for f in chosen:
            kind = "ema" if f.stem.endswith("_ema") or _kept_weights(f) == "ema" else "raw"
            weights[kind], files[kind] = read_state_dict(f), str(f)
        run_cfg = home / RunDir.CONFIG
        if run_cfg.is_file():
            saved = json.loads(run_cfg.read_text())
            cfg = _run_config(saved, model, overrides)
            task = saved.get("task") if saved.get("task") in ("finetune", "linprobe") else None  # else: from the keys
        else:
            arch = model
            if arch is None and chosen[0].suffix == ".safetensors":
                with safe_open(str(chosen[0]), "pt") as f:
                    arch = (f.metadata() or {}).get("architecture")
            if arch is None:
                raise ValueError(f"no config.json beside {src}: name the architecture with --model")
            cfg = _run_config({}, arch, overrides)
    if task not in (None, "finetune", "linprobe"):
        raise ValueError(f"{src} is a {task} run; eval needs a finetune or linprobe run")
    for kind, sd in weights.items():
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{files[kind]}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}): refusing to report accuracy from them")
    cfg.model.init = None
    any_sd = next(iter(weights.values()))
    if task is None:  # a bare weights file: a linear probe's head is BatchNorm + Linear
        with torch.device("meta"):
            cls = getattr(create_model(cfg.model.name, **model_kwargs(cfg, True)), "classifier", "head.fc")
        task = "linprobe" if f"{cls}.1.weight" in any_sd else "finetune"
    classes = None
    cls_file = home / RunDir.CLASSES
    if cls_file.is_file():
        classes = json.loads(cls_file.read_text()) or None
    elif any(str(f).endswith(".safetensors") for f in files.values()):
        with safe_open(next(f for f in files.values() if f.endswith(".safetensors")), "pt") as f:
            classes = json.loads((f.metadata() or {}).get("classes", "null")) or None
    return EvalSource(cfg, task, weights, files, classes, home, has_config=(home / RunDir.CONFIG).is_file()
                      or src.name == RunDir.LAST or (src / RunDir.LAST).is_file())


def _eval_folder(home: Path, data: str | None, split: str) -> Path:
    """``eval/<split>`` for the run's own data, ``eval/<name>-<hash>-<split>`` for other data, so evaluating
    another split or data set never overwrites an earlier result."""
    import hashlib

    if not data:
        return home / RunDir.EVAL / split
    from ..data.build import NAMED

    if data in NAMED:
        return home / RunDir.EVAL / f"{data}-{split}"
    where = Path(data).resolve()
    return home / RunDir.EVAL / f"{where.name}-{hashlib.sha1(str(where).encode()).hexdigest()[:6]}-{split}"


def run_eval(checkpoint: str | Path, data: str | None = None, out: str | Path | None = None,
             batch_size: int = 64, device: str = "auto", weights: str = "both", model: str | None = None,
             img_size: int | None = None, in_chans: int | None = None, stem_stride: int | None = None) -> dict:
    """Evaluate a fine-tune / linear-probe run or weights file (see ``load_eval_source``) on ``data`` (default: the
    run's own validation data): top-1 (top-5 with more than 5 classes), per-class accuracy and the confusion
    matrix of the trained (``raw``) and/or EMA weights, printed and written (eval.json + confusion PNGs) to
    ``out`` (default ``<run>/eval/<split>``). Under torchrun every process scores its share of the images and the
    counts are summed (the same figures as one process); the main process writes and returns the report."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose {', '.join(WEIGHTS)}")
    src = load_eval_source(checkpoint, model, **{"model.in_chans": in_chans, "model.stem_stride": stem_stride,
                                                 "data.img_size": img_size})
    if weights != "both" and weights not in src.weights:
        have = " and ".join(src.weights)
        raise ValueError(f"--weights {weights}: {checkpoint} holds only {have} weights"
                         + (" (the run kept no EMA: optim.ema_decay=0)" if weights == "ema" else ""))
    chosen = {k: v for k, v in src.weights.items() if weights in ("both", k)}
    cfg = src.cfg
    if data:
        keep = ("img_size", "num_workers", "max_pixels", "crop_scale_min")
        cfg.data = DataCfg(**{k: getattr(cfg.data, k) for k in keep}, path=data)
    elif not src.has_config:
        raise ValueError(f"{checkpoint} comes without its run's config.json: name the data with --data")
    info = D.setup(device)
    try:
        split, ds = "val", build_dataset(cfg.data, cfg.model.in_chans, "val", labeled=True, classes=src.classes)
    except FileNotFoundError:
        if not data:  # never report accuracy on the images the model was trained on
            raise ValueError(f"the run's data ({cfg.data.path}) has no validation split: pass --data <labeled folder>")
        split = "all"  # --data is a plain labeled folder
        ds = build_dataset(cfg.data, cfg.model.in_chans, "train", labeled=True, classes=src.classes)
    val = eval_loader(cfg, ds, batch_size, info=info)  # under torchrun: this process's share
    with torch.device("meta"):  # the family's classifier name, without building real weights
        num_classes = checkpoint_num_classes(next(iter(chosen.values())),
                                             create_model(cfg.model.name, **model_kwargs(cfg, True)))
    if num_classes == 0:
        raise ValueError(f"{checkpoint} holds no classifier weights: nothing to evaluate")
    classes = src.classes or getattr(ds, "classes", None) or [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"{checkpoint} has a {num_classes}-class classifier but names {len(classes)} classes")
    models = {}
    for kind, sd in chosen.items():
        net = create_model(cfg.model.name, num_classes=num_classes, **model_kwargs(cfg, classifier=True))
        if src.task == "linprobe":
            probe_head(net, num_classes)
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            from ..models import CheckpointError

            raise CheckpointError(f"{src.files[kind]} does not fit {cfg.model.name} as configured "
                                  f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                                  "check --model / --in-chans / --stem-stride") from None
        models[kind] = net.to(info.device)
    res = evaluate_classifiers(models, val, num_classes, info.device, info=info)
    if not info.is_main:  # the figures are the same on every process: the main one reports them
        return {}
    out = Path(out) if out else _eval_folder(src.home, data, split)
    report = _eval_report(src, res, classes, data or cfg.data.path, split, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / RunDir.EVAL_JSON).write_text(json.dumps(report, indent=1))
    written = [out / RunDir.EVAL_JSON]
    try:
        from ..viz.curves import plot_confusion

        for kind, r in res.items():
            written.append(plot_confusion(r["val_confusion"], out / f"confusion_{kind}.png", classes,
                                          title=f"confusion matrix, {_LABEL[kind]} weights ({split} split)"))
    except ImportError:
        pass
    print(f"wrote {', '.join(str(w) for w in written)}")
    return report


_LABEL = {"raw": "raw", "ema": "EMA"}  # as --weights names them; raw = the trained weights themselves


def _eval_report(src: EvalSource, res: dict, classes: list[str], data: str, split: str, checkpoint) -> dict:
    """Print the results (one line per weights kind, a per-class table, skipped files) and return eval.json."""
    from ..data.datasets import describe_unreadable

    first = next(iter(res.values()))
    print(f"{src.task} model {src.cfg.model.name} on {data} ({split} split): {first['val_images']} images, "
          f"{len(classes)} classes")
    for kind, r in res.items():
        top5 = f"  top-5 {r['val_top5']:.2f}%" if "val_top5" in r else ""
        print(f"{_LABEL[kind] + ' weights':>12}: top-1 {r['val_top1']:.2f}%{top5}   ({src.files[kind]})")
    if "ema" not in src.weights:
        print(f"{'':>12}  (no EMA weights in this run)")
    counts = [sum(row) for row in first["val_confusion"]]
    order = list(range(len(classes)))
    if len(order) > 30:  # a long table says little: the 15 weakest classes of the first weights kind
        order = sorted((i for i in order if first["val_per_class"][i] is not None),
                       key=lambda i: first["val_per_class"][i])[:15]
        print(f"per-class top-1, the 15 weakest of {len(classes)} (all in eval.json):")
    width = max(5, *(len(c) for c in classes))
    print(f"  {'class':<{width}} {'images':>6} " + " ".join(f"{_LABEL[k] + ' top-1':>10}" for k in res))
    for i in order:
        print(f"  {classes[i]:<{width}} {counts[i]:>6} " + " ".join(_pct(res[k]['val_per_class'][i]) for k in res))
    bad = first["val_unreadable"]
    if bad:
        print(f"not evaluated: {describe_unreadable(bad)}")
    strip = ("val_unreadable", "val_images")
    return dict(checkpoint=str(checkpoint), task=src.task, model=src.cfg.model.name, data=data, split=split,
                classes=classes, images=first["val_images"],
                unreadable=dict(count=len(bad), first=dict(sorted(bad.items())[:20])),
                weights={k: src.files[k] for k in res}, **{k: {m: v for m, v in r.items() if m not in strip}
                                                            for k, r in res.items()})



FINETUNE = training_command("finetune", "supervised fine-tuning (class sub-folders or a named dataset)", run_finetune)
LINPROBE = training_command("linprobe", "linear probe: a BatchNorm + linear classifier on a frozen backbone",
                            run_linprobe)


def _eval_arguments(e) -> None:
    import argparse

    e.add_argument("--checkpoint", required=True,
                   help="a finetune/linprobe run folder, its last.pt, or a weights file (model[_ema].safetensors)")
    e.add_argument("--weights", choices=WEIGHTS, default="both",
                   help="score the trained (raw) weights, their EMA, or both (default)")
    e.add_argument("--data", default=None, help="labeled dataset (default: the run's own validation data)")
    e.add_argument("--out", default=None, help="output folder (default: <run>/eval/<split> or eval/<data>-<split>)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--model", default=None, help="architecture, when the weights file has no config.json beside it")
    e.add_argument("--img-size", type=int, default=None, help="default: the run's data.img_size")
    e.add_argument("--in-chans", type=int, default=None, help="default: the run's model.in_chans")
    e.add_argument("--stem-stride", type=int, default=None, help="default: the run's model.stem_stride")
    e.add_argument("--patch-size", dest="stem_stride", type=int, help=argparse.SUPPRESS)  # the old name


def _eval_cli(args) -> None:
    run_eval(args.checkpoint, args.data, args.out, args.batch_size, weights=args.weights, model=args.model,
             img_size=args.img_size, in_chans=args.in_chans, stem_stride=args.stem_stride)


EVAL = Command("top-1/top-5, per-class accuracy and confusion matrix of a run", _eval_arguments, _eval_cli)
