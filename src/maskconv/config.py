"""Typed run configuration: defaults < ``--recipe file.yaml`` < ``key=value`` overrides.

Sections are dataclasses; a key is ``section.field`` (``optim.blr=1e-4``). Unknown keys and values of the
wrong type are errors before any work starts. ``resolve()`` derives what depends on the machine and the data
(world size, effective batch, ``lr = blr * batch / 256``, steps) once.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong (the message names it)."""


@dataclass
class ModelCfg:
    name: str = "convnextv2_atto"
    in_chans: int = 3
    patch_size: int = 4  # stem stride; 1-2 suit 28-32 px images
    drop_path_rate: float = 0.0
    head_init_scale: float = 1.0
    init: str | None = None  # checkpoint to start from (pretraining run or any layout load_checkpoint reads)


@dataclass
class DataCfg:
    path: str = "synthetic"  # an image folder, or a named dataset: synthetic | fashion-mnist | photos
    img_size: int = 224
    batch_size: int = 64  # per process
    num_workers: int = 2
    train_fraction: float = 1.0  # fine-tuning: per-class fraction of labels kept (semi-supervised studies)
    labels_per_class: int = 0  # fine-tuning: keep this many labels per class (0 = all)
    crop_scale_min: float = 0.2  # RandomResizedCrop lower scale (pretraining 0.2, fine-tuning 0.08)
    hflip: bool = True
    rand_augment: str = ""  # torchvision RandAugment "m9" style: "" (off) or "n2-m9"
    reprob: float = 0.0  # RandomErasing probability
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class OptimCfg:
    epochs: int = 10
    warmup_epochs: float = 1.0
    blr: float = 1.5e-4  # base lr for an effective batch of 256
    lr: float | None = None  # absolute lr; derived from blr when None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float = 1.0  # 1.0 = off
    layer_decay_scheme: str = "single"  # single | group (official ConvNeXt V2)
    clip_grad: float | None = None
    accum_steps: int = 1
    ema_decay: float = 0.0  # 0 = off


@dataclass
class ObjectiveCfg:
    name: str = "fcmae"
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    sparse: str = "gather"


@dataclass
class RunCfg:
    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | off | bf16 | fp16
    save_every_epochs: int = 1
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends only)
    log_every_steps: int = 10
    tensorboard: bool = False
    progress: bool = True
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); for smoke tests


@dataclass
class Config:
    task: str = "pretrain"  # pretrain | finetune | linprobe
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _coerce(value, tp, key: str):
    """Convert ``value`` (YAML scalar or string from the command line) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)) or len(items) != len(typing.get_args(tp)):
            raise ConfigError(f"{key}: expected {len(typing.get_args(tp))} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, typing.get_args(tp)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _fields(obj) -> dict[str, tuple[object, object]]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: (hints[f.name], getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def set_key(cfg: Config, key: str, value) -> None:
    """Set ``section.field`` (or a top-level field) from a YAML/CLI value, type-checked."""
    parts = key.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        fields = _fields(obj)
        if p not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has {', '.join(sorted(fields))}")
        tp, cur = fields[p]
        if dataclasses.is_dataclass(cur):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: is a section; set its fields ({key}.<name>=...)")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v)
                return
            obj = cur
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        setattr(obj, p, _coerce(value, tp, key))
        return


def flat_keys(cfg: Config | None = None) -> dict[str, tuple[object, object]]:
    """``{'optim.blr': (type, default), ...}`` for every leaf field (used to generate CLI flags)."""
    out = {}

    def walk(obj, prefix):
        for name, (tp, cur) in _fields(obj).items():
            if dataclasses.is_dataclass(cur):
                walk(cur, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = (tp, cur)

    walk(cfg or Config(), "")
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: Config | None = None) -> Config:
    """defaults (or ``base``) < recipe YAML < overrides (``["optim.blr=1e-4", ...]`` or a dict)."""
    cfg = base or Config()
    if recipe:
        path = _recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of keys to values")
        for k, v in data.items():
            set_key(cfg, k, v)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in (overrides or [])]
    for k, v in items:
        set_key(cfg, k, yaml.safe_load(v) if isinstance(v, str) and v != "" else v)
    return cfg


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def _recipe_path(recipe: str | Path) -> Path:
    p = Path(recipe)
    if p.is_file():
        return p
    packaged = Path(__file__).parent / "recipes" / f"{recipe}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(q.stem for q in (Path(__file__).parent / "recipes").glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a file nor a packaged recipe ({', '.join(names)})")
