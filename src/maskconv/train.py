"""Training tasks behind ``maskconv pretrain | finetune | linprobe | eval`` (re-exported by ``maskconv.api``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import Config, DataCfg
from .data.build import build_dataset, build_transform, num_classes_of
from .data.datasets import collate_skip
from .engine import dist as D
from .engine.loop import FitResult, fit
from .models import checkpoint_num_classes, create_model, load_checkpoint, save_weights


def _model_kwargs(cfg: Config, classifier: bool = False) -> dict:
    m = cfg.model
    kw = dict(in_chans=m.in_chans, patch_size=m.patch_size, drop_path_rate=m.drop_path_rate)
    if classifier:  # pooling belongs to the classifier; a pretraining encoder keeps its own
        kw["global_pool"] = m.global_pool
    return {k: v for k, v in kw.items() if v is not None}  # None: the model's own default


def run_pretrain(cfg: Config) -> FitResult:
    """Masked-image pretraining of ``cfg.model`` with ``cfg.objective`` on unlabeled images."""
    from .pretrain import create_objective, save_objective

    from .pretrain.masking import indexed_masks

    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    ob = cfg.objective
    ob_kw = dict(mask_ratio=ob.mask_ratio, decoder_dim=ob.decoder_dim, decoder_depth=ob.decoder_depth,
                 norm_pix_loss=ob.norm_pix_loss, sparse=ob.sparse)
    obj = create_objective(ob.name, model=cfg.model.name, model_kwargs=_model_kwargs(cfg),
                           **{k: v for k, v in ob_kw.items() if v is not None})  # None: the objective's default
    if cfg.model.init:  # continue pretraining: a whole objective, or encoder weights in any layout
        try:
            load_checkpoint(obj, cfg.model.init)
        except ValueError as whole_err:
            try:
                load_checkpoint(obj.encoder, cfg.model.init)
            except ValueError as enc_err:  # say both: a whole-objective file may fail for its own reason
                raise ValueError(f"{cfg.model.init} loads neither as a whole {ob.name} objective ({whole_err}) nor as "
                                 f"encoder weights ({enc_err})") from enc_err
    ds = build_dataset(cfg.data, cfg.model.in_chans, "train", labeled=False, seed=cfg.run.seed)
    tf = build_transform(cfg.data, cfg.model.in_chans, train=True, pretrain=True)

    def loss_fn(m, x, y, keys=None):
        """Masks from each sample's (seed, epoch, global index): N processes draw exactly one process's masks."""
        if keys is None:  # (SNIP's scoring batch) the objective draws its own
            return m(x).loss
        h, w = obj.grid(x)
        return m(x, mask=indexed_masks(keys[0], keys[1], cfg.run.seed, h, w, obj.mask_ratio, x.device)).loss

    res = fit(cfg, obj, ds, tf, loss_fn, task="pretrain", info=info, keyed_loss=True)
    if info.is_main:
        full = res.state_dict if res.state_dict is not None else obj.state_dict()
        save_objective(obj, res.out / "objective.safetensors", full)  # encoder + decoder + config
        enc = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
        save_weights(enc, res.out / "encoder.safetensors",  # strict-loads into create_model / timm
                     metadata={"architecture": cfg.model.name})
        print(f"weights: {res.out / 'encoder.safetensors'} (encoder), {res.out / 'objective.safetensors'} (all)")
    res.run.release()
    return res


def _eval_loader(cfg: Config, classes: list[str] | None, split: str = "val",
                 batch_size: int | None = None) -> DataLoader | None:
    """Eval-transformed loader of ``split`` (None when the data has no such split); undecodable files are
    dropped, not replaced, so no image is counted twice."""
    from .data.datasets import SeededDataset

    try:
        ds = build_dataset(cfg.data, cfg.model.in_chans, split, labeled=True, classes=classes)
    except FileNotFoundError:
        if split == "val":
            return None
        raise
    tf = build_transform(cfg.data, cfg.model.in_chans, train=False)
    return DataLoader(SeededDataset(ds, tf, replace_bad=False), batch_size=batch_size or cfg.data.batch_size,
                      num_workers=cfg.data.num_workers, collate_fn=collate_skip)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, num_classes: int, device=None,
                        progress: bool = True) -> dict:
    """Top-1 / top-5 accuracy (%), per-class accuracy and the confusion matrix (rows = truth)."""
    model.eval()
    device = device or next(model.parameters()).device
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = n = 0
    from tqdm import tqdm

    # disable=None: tqdm shows the bar on a terminal only, never floods a log file
    for images, labels, _ in tqdm(loader, desc="eval", unit="batch", leave=False, disable=(not progress) or None):
        if images is None:  # every file of this batch was undecodable
            continue
        if labels.max() >= num_classes or labels.min() < 0:
            raise ValueError(f"labels {labels.min().item()}..{labels.max().item()} outside the model's "
                             f"{num_classes} classes")
        logits = model(images.to(device)).float().cpu()
        pred = logits.argmax(1)
        conf += torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum().item()
        n += len(labels)
    per_class = (conf.diag().float() / conf.sum(1).clamp_min(1) * 100).tolist()
    return dict(val_top1=conf.diag().sum().item() / max(1, n) * 100, val_top5=top5 / max(1, n) * 100,
                val_per_class=per_class, val_confusion=conf.tolist(), val_images=n)


def _probe_head(model: nn.Module, num_classes: int) -> nn.Module:
    """MAE linear-probe head: BatchNorm without affine, then Linear (std 0.01 init). Returns the head."""
    probe = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6),
                          nn.Linear(model.num_features, num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    parent, _, attr = getattr(model, "classifier", "head.fc").rpartition(".")  # 'head.fc' (ConvNeXt), 'head' (ViT)
    setattr(model.get_submodule(parent) if parent else model, attr, probe)
    return probe


def _classifier(cfg: Config, num_classes: int, linprobe: bool = False) -> nn.Module:
    kw = _model_kwargs(cfg, classifier=True)
    if linprobe:
        kw["drop_path_rate"] = 0.0  # the frozen backbone must give the same features every time
    model = create_model(cfg.model.name, num_classes=num_classes, head_init_scale=cfg.model.head_init_scale, **kw)
    if cfg.model.init:
        rep = load_checkpoint(model, cfg.model.init, drop_mismatched_head=True)
        print(f"init from {cfg.model.init} ({rep.layout} layout; left at init: {', '.join(rep.skipped) or 'none'})")
    return model


def _supervised(cfg: Config, linprobe: bool) -> FitResult:
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    torch.manual_seed(cfg.run.seed)
    ds = build_dataset(cfg.data, cfg.model.in_chans, "train", labeled=True, seed=cfg.run.seed)
    n = num_classes_of(ds)
    classes = list(getattr(ds, "classes", []))
    model = _classifier(cfg, n, linprobe)
    train_mode = None
    if linprobe:  # MAE protocol: frozen backbone, BatchNorm (no affine) + linear head
        model.requires_grad_(False)
        probe = _probe_head(model, n)

        def train_mode(m: nn.Module) -> None:  # frozen means frozen: backbone BatchNorm stats / dropout stay eval
            m.eval()
            probe.train()
    batch_tf = None
    d = cfg.data
    if (d.mixup > 0 or d.cutmix > 0) and not linprobe:
        from torchvision.transforms import v2

        choices = ([v2.MixUp(alpha=d.mixup, num_classes=n)] if d.mixup > 0 else []) + \
                  ([v2.CutMix(alpha=d.cutmix, num_classes=n)] if d.cutmix > 0 else [])
        batch_tf = v2.RandomChoice(choices)
    tf = build_transform(d, cfg.model.in_chans, train=not linprobe)  # the probe sees eval-style crops
    val = _eval_loader(cfg, classes) if info.is_main else None

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y, label_smoothing=d.label_smoothing)

    def evaluate(m):
        if val is None:
            return {}
        r = evaluate_classifier(m, val, n, info.device, progress=cfg.run.progress)
        (train_mode or nn.Module.train)(m)
        return {k: v for k, v in r.items() if k in ("val_top1", "val_top5")}

    task = "linprobe" if linprobe else "finetune"
    res = fit(cfg, model, ds, tf, loss_fn, task=task, batch_transform=batch_tf, evaluate=evaluate,
              backbone=model if cfg.optim.layer_decay != 1.0 else None, info=info, train_mode=train_mode,
              files={"classes.json": json.dumps(classes)})  # eval numbers classes the same way
    if info.is_main:
        meta = {"num_classes": str(n), "classes": json.dumps(classes)}
        save_weights(res.state_dict if res.state_dict is not None else model, res.out / "model.safetensors",
                     metadata={"architecture": cfg.model.name, **meta})
        if res.ema is not None:
            save_weights(res.ema, res.out / "model_ema.safetensors", metadata=meta)
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


def run_eval(checkpoint: str | Path, data: str | None = None, out: str | Path | None = None,
             batch_size: int = 64, device: str = "auto") -> dict:
    """Evaluate a fine-tune / linear-probe run (its ``last.pt``, or the run folder) on ``data`` (default: the
    run's own validation data): top-1/top-5, per-class accuracy, confusion matrix (JSON + PNG)."""
    from .engine.checkpoint import LAST, load_training_checkpoint
    from .config import load_config

    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        ckpt = ckpt / LAST
    ck = load_training_checkpoint(ckpt)
    if ck.get("task") not in ("finetune", "linprobe"):
        raise ValueError(f"{ckpt} is a {ck.get('task')} run; eval needs a finetune or linprobe run")
    saved = ck["config"]
    cfg = load_config(overrides={k: v for k, v in _flatten(saved).items() if k != "task"})
    if data:
        cfg.data = DataCfg(**{**{k: getattr(cfg.data, k) for k in ("img_size", "num_workers")}, "path": data})
    cfg.model.init = None
    info = D.setup(device)
    cls_file = ckpt.parent / "classes.json"
    classes = (json.loads(cls_file.read_text()) or None) if cls_file.is_file() else None
    val = _eval_loader(cfg, classes, "val", batch_size)
    if val is None:
        if not data:  # never report accuracy on the images the model was trained on
            raise ValueError(f"the run's data ({cfg.data.path}) has no validation split: pass --data <labeled folder>")
        val = _eval_loader(cfg, classes, "train", batch_size)  # --data is a plain labeled folder
    with torch.device("meta"):  # the family's classifier name, without building real weights
        num_classes = checkpoint_num_classes(ck["model"], create_model(cfg.model.name, **_model_kwargs(cfg, True)))
    if num_classes == 0:
        raise ValueError(f"{ckpt} holds no classifier weights: nothing to evaluate")
    model = create_model(cfg.model.name, num_classes=num_classes, **_model_kwargs(cfg, classifier=True))
    if ck["task"] == "linprobe":
        _probe_head(model, num_classes)
    weights, which = ck["model"], "trained"
    if ck.get("ema") is not None:  # evaluate the EMA weights when the run kept them (official recipes do)
        weights = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
        which = "EMA"
    model.load_state_dict(weights)
    model.to(info.device)
    res = evaluate_classifier(model, val, num_classes, info.device)
    out = Path(out) if out else ckpt.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    res["weights"] = which
    print(f"top-1 {res['val_top1']:.2f}%  top-5 {res['val_top5']:.2f}%  on {res['val_images']} images "
          f"({which} weights)")
    try:
        from .viz.curves import plot_confusion

        plot_confusion(res["val_confusion"], out / "confusion.png")
        print(f"confusion matrix: {out / 'confusion.png'}")
    except ImportError:
        pass
    return res


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
