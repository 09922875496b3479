"""Typed run configuration: defaults < ``--recipe file.yaml`` < ``key=value`` overrides.

Sections are dataclasses; a key is ``section.field`` (``optim.blr=1e-4``). Unknown keys and values of the
wrong type are errors before any work starts. ``resolve()`` derives what depends on the machine and the data
(world size, effective batch, ``lr = blr * batch / 256``, steps) once, when the run starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Option vocabularies, each defined once: the config's field types (``validate`` refuses any other word) and the
# code that branches on them reads the words from here (``literal_words``).
Device = typing.Literal["auto", "cpu", "cuda"]
Amp = typing.Literal["auto", "off", "bf16", "fp16"]  # auto: bf16 on GPU, off on CPU
SparsePath = typing.Literal["gather", "dense"]  # FCMAE / ConvMAE compute paths of the same masked semantics
SparsityInit = typing.Literal["snip", "erk", "uniform"]  # SLaK's layer-wise density at init
LayerDecayScheme = typing.Literal["single", "group"]  # layer ids: one per block, or the official ConvNeXt V2 groups
Logger = typing.Literal["none", "tensorboard", "wandb", "mlflow"]  # run.logger: the tracker beside metrics.jsonl
KeepBestMode = typing.Literal["auto", "max", "min"]  # run.keep_best_mode; auto: min for a loss, max otherwise
CompileMode = typing.Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile
# Training augmentations of finetune: torchvision v2 (built in) or timm's create_transform + Mixup (the official
# ConvNeXt / ConvNeXt V2 / MAE fine-tuning code; extra `augment`); timm's RandomErasing fill and Mixup modes
AugmentLib = typing.Literal["torchvision", "timm"]
ErasingMode = typing.Literal["const", "rand", "pixel"]
MixupMode = typing.Literal["batch", "pair", "elem"]
Interpolation = typing.Literal["bicubic", "bilinear", "nearest", "random"]  # timm's train resize ('random': either)
OptimizerName = typing.Literal["adamw", "lars"]  # lars: MAE's linear probe (engine/optim.LARS)
# The commands a config runs as (``commands.UNUSED`` says which keys each reads); a recipe names its task.
Task = typing.Literal["pretrain", "finetune", "linprobe", "pix2seq", "detect", "segment"]
# Pix2Seq input class corruption (official class_label_corruption, pix2seq/tokenizer.py) and v2 tasks, in their
# canonical order (pix2seq/multitask.py)
Corruption = typing.Literal["none", "rand_cls", "real_n_fake_cls", "rand_n_fake_cls", "real_n_rand_n_fake_cls"]
PIX2SEQ_TASKS = ("det", "seg", "kpt", "cap")
MASK_RATIO_RANGE = "in (0, 1)"


def mask_ratio_ok(ratio: float) -> bool:
    """The one range of a mask ratio (config, objectives, masks): at least one patch masked and one visible."""
    return 0.0 < ratio < 1.0


def literal_words(tp) -> tuple[str, ...]:
    """The words of a vocabulary type (``Literal[...]``, also inside ``X | None``); () for any other type."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((w for w in map(literal_words, typing.get_args(tp)) if w), ())
    return ()


def one_of(words) -> str:
    """'a, b or c' (a vocabulary type or its words)."""
    words = literal_words(words) or tuple(words)
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def parse_bool(value, key: str = "value") -> bool:
    """The one strict bool parsing (config overrides and CLI flags): true/1/yes/on or false/0/no/off; any
    other word (a typo such as ``flase``) is a ConfigError, never a silent False."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


class ConfigError(ValueError):
    """A configuration key or value is wrong (the message names it)."""


@dataclass
class ModelCfg:
    name: str = "convnextv2_atto"  # registered architecture (`maskconv models` lists them)
    in_chans: int = 3  # input channels (1 = grayscale); pretrained weights are adapted
    stem_stride: int | None = None  # stem stride (ViT/ConvMAE: the patch); none = the model's own (4, ViT 16); 1-2 suit 28-32 px
    width_mult: float = 1.0  # every stage's width times this (roadmap_* models: narrow copies of the paper's steps)
    drop_path_rate: float = 0.0  # stochastic depth rate at the last block (linear in depth)
    head_init_scale: float = 1.0  # scale of the classifier's initial weights (official fine-tuning 0.001)
    global_pool: str | None = None  # classifier pooling; none = the model's own (ViT 'token'; MAE fine-tuning 'avg')
    init: str | None = None  # checkpoint to start from (pretraining run or any layout load_checkpoint reads)


@dataclass
class DataCfg:
    path: str = ""  # required: an image folder, or a named dataset: synthetic | fashion-mnist | photos
    img_size: int = 224  # square training / validation crop size (a multiple of the model's total stride)
    batch_size: int = 64  # images per step per process
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process); kept for the whole run
    prefetch_factor: int = 2  # training batches each worker prepares ahead (num_workers > 0)
    labels_per_class: int = 0  # fine-tuning: keep this many labels per class (0 = all)
    val_fraction: float = 0.0  # labeled folder without train/ + val/: hold out this fraction of each class as val
    crop_scale_min: float = 0.2  # RandomResizedCrop lower scale (pretraining 0.2, fine-tuning 0.08)
    hflip: bool = True  # random horizontal flips in training
    augment_lib: AugmentLib = "torchvision"  # finetune augmentations: torchvision (v2) | timm (official recipes; extra augment)
    rand_augment: str = ""  # torchvision RandAugment "m9" style: "" (off) or "n2-m9"
    auto_augment: str = ""  # timm only: timm's policy string, e.g. rand-m9-mstd0.5-inc1 (official --aa); "" = off
    color_jitter: float | None = None  # timm only: colour jitter strength (none = off; timm turns it off under auto_augment)
    interpolation: Interpolation = "bicubic"  # timm only: RandomResizedCrop / auto-augment resampling
    reprob: float = 0.0  # RandomErasing probability
    remode: ErasingMode = "const"  # RandomErasing fill: const (zeros) | rand, pixel (timm only: normal noise per channel / pixel)
    recount: int = 1  # timm only: RandomErasing regions per image
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    mixup_prob: float = 1.0  # timm only: probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # timm only: probability of CutMix rather than MixUp when both are on
    mixup_mode: MixupMode = "batch"  # timm only: one draw per batch | pair | elem
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    max_pixels: int = 50_000_000  # images decoding to more pixels are skipped (after JPEG reduce-on-decode); 0 = off
    mean: tuple[float, ...] | None = None  # per-channel normalisation mean; none = ImageNet's (RGB) or 0.5; `maskconv data stats`
    std: tuple[float, ...] | None = None  # per-channel normalisation std; none = ImageNet's (RGB) or 0.5
    stream_length: int = 0  # wds: / hf-stream: sources: samples per epoch (0 = the stream's own count, when it has one)
    shuffle_buffer: int = 1000  # wds: / hf-stream: sources: shuffle buffer per sub-stream (1 = stream order)


@dataclass
class OptimCfg:
    name: OptimizerName = "adamw"  # adamw | lars (MAE linear probe: SGD momentum 0.9 scaled per weight matrix)
    epochs: int = 10  # training epochs (the lr schedule spans them, or run.max_steps)
    warmup_epochs: float = 1.0  # linear lr warm-up, in epochs (fractions allowed)
    blr: float = 1.5e-4  # base lr for an effective batch of 256
    lr: float | None = None  # absolute lr; derived from blr when None
    min_lr: float = 0.0  # lr at the end of the cosine schedule
    weight_decay: float = 0.05  # weight decay (never on biases, norms, GRN, tokens)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (lars: unused)
    layer_decay: float = 1.0  # layer-wise lr decay factor (1.0 = off)
    layer_decay_scheme: LayerDecayScheme = "single"  # single | group (official ConvNeXt V2)
    clip_grad: float | None = None  # clip the gradient norm to this (none = off)
    accum_steps: int = 1  # micro-batches accumulated per optimizer step
    ema_decay: float = 0.0  # EMA of the weights, decay per step (0 = off)
    ema_warmup: bool = True  # timm ModelEmaV3 warm-up: step t decays by min(ema_decay, 1 - (1 + t)^(-2/3))


@dataclass
class ObjectiveCfg:
    name: str = "fcmae"  # pretraining objective: fcmae | mae | convmae
    # none = the objective's own default (mask_ratio: FCMAE 0.6, MAE/ConvMAE 0.75; decoder_depth: FCMAE 1, MAE 8)
    mask_ratio: float | None = None  # fraction of patches masked; none = the objective's own (FCMAE 0.6, MAE 0.75)
    decoder_dim: int = 512  # decoder width
    decoder_depth: int | None = None  # decoder blocks; none = the objective's own (FCMAE 1, MAE 8)
    norm_pix_loss: bool = True  # predict per-patch normalised pixels (MAE/FCMAE default)
    sparse: SparsePath | None = None  # FCMAE / ConvMAE only: gather (default) | dense


@dataclass
class RunCfg:
    out: str = "runs/default"  # run folder: config, metrics, checkpoints, weights (re-run to resume)
    seed: int = 0  # random seed (data order, masks, init)
    device: Device = "auto"  # auto | cpu | cuda
    amp: Amp = "auto"  # auto (bf16 on GPU, off on CPU) | off | bf16 | fp16
    save_every_epochs: int = 1  # checkpoint every N epochs
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends only)
    save_every_minutes: float = 10.0  # also checkpoint when this much time passed since the last one (0 = off)
    eval_every_epochs: int = 1  # validation cadence (the last epoch is always evaluated)
    keep_best: str = ""  # keep the best evaluated epoch's weights by this logged metric (e.g. val_top1, val_AP50); "" = off
    keep_best_mode: KeepBestMode = "auto"  # max | min | auto (min for a loss, max otherwise)
    log_every_steps: int = 10  # metrics.jsonl / console cadence in optimizer steps (the loss is read and checked then)
    logger: Logger = "none"  # experiment tracker beside metrics.jsonl (engine/loggers.py)
    progress: bool = True  # tqdm progress bar with ETA
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); the lr schedule spans them
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun: shards params, grads, optimizer state
    allow_config_change: bool = False  # resume with other training settings, recording the change and its step
    dist_timeout_minutes: float = 5.0  # a collective waits this long for a stopped / hung process, then the job ends
    compile: bool = False  # torch.compile the model's forward as one graph (fullgraph); the first steps pay the compile
    compile_mode: CompileMode = "default"  # torch.compile mode (reduce-overhead: CUDA graphs)
    compile_dynamic: bool | None = None  # dynamic shapes; none = torch's default (recompile once when a shape changes)


@dataclass
class DynamicSparsityCfg:
    """Dynamic sparse training (SLaK); ``engine/sparsity.py``. Not ``objective.sparse`` (FCMAE's compute path)."""
    sparsity: float = 0.0  # fraction of the chosen weights held at zero (0 = dense training; SLaK uses 0.4)
    init: SparsityInit = "snip"  # layer-wise density at init: snip | erk | uniform
    prune_rate: float = 0.3  # fraction of each layer's active weights pruned and regrown per update (cosine-decayed)
    min_prune_rate: float = 0.005  # floor of the cosine decay (official eta_min)
    update_every: int = 100  # optimizer steps between prune/regrow updates (0 = a fixed mask)
    include: str = ""  # regex (re.search) on weight names, e.g. "LoRA|small_conv"; "" = every conv/linear weight


@dataclass
class Pix2SeqOptions:
    """Pix2Seq task settings (``maskconv pix2seq train``; pix2seq/task.py). Defaults: the official detection recipe
    (google-research/pix2seq, configs/config_det_finetune.py) with the decoder of its ResNet variant
    (configs/config_base.py: 6 x 256, 8 heads, MLP 1024)."""
    bins: int = 0  # coordinate quantization bins; 0 = about 2 per pixel of data.img_size, at most 1000
    max_objects: int = 100  # objects per sequence (5 tokens each); noise boxes fill every free slot
    dim: int = 256  # decoder width
    depth: int = 6  # decoder blocks
    heads: int = 8  # decoder attention heads (dim a multiple of heads)
    mlp_ratio: float = 4.0  # decoder MLP width / dim
    drop: float = 0.1  # decoder dropout (official drop_units)
    drop_path: float = 0.1  # decoder stochastic depth
    jitter_min: float = 0.3  # training scale jitter, smallest factor
    jitter_max: float = 2.0  # training scale jitter, largest factor
    noise: bool = True  # fill each sequence with noise boxes (duplicate + bad, labelled fake)
    corruption: Corruption = "rand_n_fake_cls"  # input class corruption
    noise_bbox_weight: float = 1.0  # loss weight of a noise box's (fake) class token
    eos_token_weight: float = 0.1  # loss weight of padding / end targets
    top_p: float = 0.4  # detection decoding nucleus (official top-p: the top token always kept)
    temperature: float = 1.0  # decoding temperature
    hflip: bool = True  # random horizontal flips in training
    # Pix2Seq v2 (pix2seq/multitask.py): the tasks, their loss weights (comma lists) and per-task settings (official
    # config_multi_task.py values: seg 10 instances x 128 points, end weight 1, 8 samples at top-p 0.8, masks
    # thresholded at 0.5; keypoints invisible weight 0.1, end weight 0, top-p 0.1; captions end weight 0.1,
    # input drop 0.5, top-p 1.0)
    tasks: str = "det"  # comma list of det, seg, kpt, cap
    task_weights: str = ""  # comma list, one loss weight per task ("" = 1 each)
    seg_max_instances: int = 10  # instance segmentation: instances per row
    seg_max_points: int = 128  # instance segmentation: polygon points per instance
    seg_eos_weight: float = 1.0  # instance segmentation: end-token loss weight
    seg_samples: int = 8  # instance segmentation: sequences sampled and averaged per mask
    seg_top_p: float = 0.8  # instance segmentation: decoding nucleus
    seg_threshold: float = 0.5  # instance segmentation: mask threshold on the averaged samples
    kpt_max_instances: int = 10  # keypoints: instances per row
    kpt_invisible_weight: float = 0.1  # keypoints: loss weight of an invisible point
    kpt_eos_weight: float = 0.0  # keypoints: end-token loss weight
    kpt_top_p: float = 0.1  # keypoints: decoding nucleus
    kpt_sigmas: str = ""  # keypoints: OKS sigmas, comma list ("" = COCO person's for 17 points, else 0.05 each)
    cap_max_len: int = 64  # captions: tokens per caption
    cap_eos_weight: float = 0.1  # captions: end-token loss weight
    cap_input_drop: float = 0.5  # captions: input token drop rate
    cap_top_p: float = 1.0  # captions: decoding nucleus

    def __post_init__(self):  # built directly (API, a run's pix2seq.json): the checks validate() makes
        check_section(self, "pix2seq")

    def resolved_bins(self, img_size: int) -> int:
        from .pix2seq.vocab import default_bins

        return self.bins or default_bins(img_size)


@dataclass
class Config:
    task: Task = "pretrain"  # the command it runs as: pretrain | finetune | linprobe | pix2seq | detect | segment
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    run: RunCfg = field(default_factory=RunCfg)
    dynamic_sparsity: DynamicSparsityCfg = field(default_factory=DynamicSparsityCfg)
    pix2seq: Pix2SeqOptions = field(default_factory=Pix2SeqOptions)

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
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[float, ...]: one or more values
            if not isinstance(items, (list, tuple)) or not items:
                raise ConfigError(f"{key}: expected comma-separated values, got {value!r}")
            return tuple(_coerce(v, args[0], key) for v in items)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if tp is bool:
        return parse_bool(value, key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:  # "3", "3.0", "1e3" are integers; "2.5", "inf", "ten" are not
            text = str(value).strip()
            return int(text) if text.lstrip("+-").isdigit() else _integral(float(text))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if typing.get_origin(tp) is typing.Literal:  # a word of a vocabulary: checked by validate, with the others
        return _coerce(value, str, key)
    if tp is str:  # taken verbatim: paths may hold '#', ':' or look like numbers
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _integral(f: float) -> int:
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f)
    return int(f)


def _fields(obj) -> dict[str, tuple[object, object]]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: (hints[f.name], getattr(obj, f.name)) for f in dataclasses.fields(obj)}


# Renamed keys, still read from recipes, overrides and saved runs (config.json, checkpoints) with a warning.
# model.patch_size meant the ConvNeXt stem stride, while timm's ConvNeXt patch_size=2 builds another network.
RENAMED = {"model.patch_size": "model.stem_stride"}
# Keys replaced by a key with other values: old key -> (new key, old value -> new value, or None: nothing to set).
# run.tensorboard=true became run.logger=tensorboard when W&B and MLflow joined (engine/loggers.py).
REPLACED = {"run.tensorboard": ("run.logger", lambda on: "tensorboard" if _coerce(on, bool, "run.tensorboard") else None)}
# Renamed sections (every key under them). sparse.* (SLaK dynamic sparse training) read like objective.sparse
# (FCMAE's gather/dense compute path), an unrelated thing.
RENAMED_SECTIONS = {"sparse": "dynamic_sparsity"}


def renamed_key(key: str) -> str | None:
    """The current name of a renamed key (``sparse.init`` -> ``dynamic_sparsity.init``), else None."""
    if key in RENAMED:
        return RENAMED[key]
    head, dot, rest = key.partition(".")
    return RENAMED_SECTIONS[head] + dot + rest if head in RENAMED_SECTIONS else None


def old_keys() -> list[str]:
    """Every former key name still read (for hidden CLI flags)."""
    out = list(RENAMED)
    for old, new in RENAMED_SECTIONS.items():
        out += [old + k[len(new):] for k in flat_keys() if k.startswith(new + ".")]
    return out


def set_key(cfg: Config, key: str, value) -> None:
    """Set ``section.field`` (or a top-level field) from a YAML/CLI value, type-checked."""
    new = renamed_key(key)
    if new is not None:
        import warnings

        warnings.warn(f"config key {key} is renamed {new}; reading it as that", FutureWarning, stacklevel=2)
        key = new
    if key in REPLACED:
        import warnings

        new, convert = REPLACED[key]
        to = convert(value)
        warnings.warn(f"config key {key} is replaced by {new}; reading {key}={value} as "
                      f"{f'{new}={to}' if to is not None else 'nothing to set'}", FutureWarning, stacklevel=2)
        if to is None:
            return
        key, value = new, to
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


def load_saved_config(flat: dict) -> Config:
    """A config saved in a run folder (``config.json``, flattened) as a ``Config``. Keys an older maskconv wrote
    under a name since renamed are read as their new names with ONE FutureWarning for the whole file, not one per
    key (a run folder is the user's record, not their typing)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FutureWarning)
        cfg = load_config(overrides=flat)
    old = sorted({str(w.message).split()[2] for w in seen if issubclass(w.category, FutureWarning)
                  and str(w.message).startswith("config key ")})
    for w in seen:  # anything else passes through unchanged
        if not (issubclass(w.category, FutureWarning) and str(w.message).startswith("config key ")):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if old:
        warnings.warn(f"this run's config was saved by an older maskconv; read {len(old)} renamed key(s) under their "
                      f"new names ({', '.join(old)})", FutureWarning, stacklevel=2)
    return cfg


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
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in (overrides or [])]
    for k, v in items:
        set_key(cfg, k, v)  # strings are parsed by the field's type, never as YAML
    return validate(cfg)


# data keys only timm's pipeline reads (data.augment_lib=timm), with what torchvision's pipeline does instead
TIMM_ONLY = {"auto_augment": "", "color_jitter": None, "interpolation": "bicubic", "remode": "const", "recount": 1,
             "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch"}
# (key, check, requirement) for values whose type is right but whose range is not
_RANGES = [
    ("data.batch_size", lambda v: v >= 1, ">= 1"), ("data.img_size", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"), ("data.labels_per_class", lambda v: v >= 0, ">= 0"),
    ("data.prefetch_factor", lambda v: v >= 1, ">= 1"),
    ("data.crop_scale_min", lambda v: 0 < v <= 1, "in (0, 1]"), ("data.reprob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.mixup", lambda v: v >= 0, ">= 0"), ("data.cutmix", lambda v: v >= 0, ">= 0"),
    ("data.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"), ("data.max_pixels", lambda v: v >= 0, ">= 0"),
    ("data.stream_length", lambda v: v >= 0, ">= 0"), ("data.shuffle_buffer", lambda v: v >= 1, ">= 1"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.color_jitter", lambda v: v is None or v >= 0, ">= 0 (or none)"), ("data.recount", lambda v: v >= 1, ">= 1"),
    ("data.mixup_prob", lambda v: 0 <= v <= 1, "in [0, 1]"), ("data.mixup_switch_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data", lambda d: d.augment_lib != "timm" or not d.rand_augment,
     "data.auto_augment (timm's policy string, e.g. rand-m9-mstd0.5-inc1), not data.rand_augment, with data.augment_lib=timm"),
    *[("data", lambda d, k=k, v=v: d.augment_lib == "timm" or getattr(d, k) == v,
       f"data.augment_lib=timm to set data.{k} (torchvision's pipeline has {k}={v!r})") for k, v in TIMM_ONLY.items()],
    ("data.std", lambda v: v is None or min(v) > 0, "> 0 for every channel (or none)"),
    ("model.in_chans", lambda v: v >= 1, ">= 1"), ("model.stem_stride", lambda v: v is None or v >= 1, ">= 1"),
    ("model.width_mult", lambda v: v > 0, "> 0"),
    ("model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.epochs", lambda v: v >= 1, ">= 1"), ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.blr", lambda v: v > 0, "> 0"), ("optim.lr", lambda v: v is None or v > 0, "> 0"),
    ("optim.min_lr", lambda v: v >= 0, ">= 0"), ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"), ("optim.accum_steps", lambda v: v >= 1, ">= 1"),
    ("optim.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.clip_grad", lambda v: v is None or v > 0, "> 0 (or none)"),
    ("objective.mask_ratio", lambda v: v is None or mask_ratio_ok(v), MASK_RATIO_RANGE),
    ("objective.decoder_dim", lambda v: v >= 1, ">= 1"),
    ("objective.decoder_depth", lambda v: v is None or v >= 0, ">= 0"),
    ("run.save_every_epochs", lambda v: v >= 1, ">= 1"), ("run.save_every_steps", lambda v: v >= 0, ">= 0"),
    ("run.eval_every_epochs", lambda v: v >= 1, ">= 1"), ("run.log_every_steps", lambda v: v >= 1, ">= 1"),
    ("run.max_steps", lambda v: v >= 0, ">= 0"), ("run.out", lambda v: v.strip() != "", "a folder (not empty)"),
    ("run.save_every_minutes", lambda v: v >= 0, ">= 0"), ("run.dist_timeout_minutes", lambda v: v > 0, "> 0"),
    ("run.seed", lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
    ("dynamic_sparsity.sparsity", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dynamic_sparsity.prune_rate", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dynamic_sparsity.min_prune_rate", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dynamic_sparsity", lambda v: v.min_prune_rate <= v.prune_rate,
     "dynamic_sparsity.min_prune_rate <= dynamic_sparsity.prune_rate"),
    ("dynamic_sparsity.update_every", lambda v: v >= 0, ">= 0"),
    ("dynamic_sparsity.include", lambda v: _is_regex(v), "a valid regular expression"),
    ("pix2seq.bins", lambda v: v == 0 or v >= 2, "0 (auto) or >= 2"), ("pix2seq.max_objects", lambda v: v >= 1, ">= 1"),
    ("pix2seq.dim", lambda v: v >= 1, ">= 1"), ("pix2seq.depth", lambda v: v >= 1, ">= 1"),
    ("pix2seq.heads", lambda v: v >= 1, ">= 1"),
    ("pix2seq", lambda o: o.dim % o.heads == 0, "pix2seq.dim a multiple of pix2seq.heads"),
    ("pix2seq.mlp_ratio", lambda v: v > 0, "> 0"),
    ("pix2seq.drop", lambda v: 0 <= v < 1, "in [0, 1)"), ("pix2seq.drop_path", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pix2seq.jitter_min", lambda v: v > 0, "> 0"),
    ("pix2seq", lambda o: o.jitter_min <= o.jitter_max, "pix2seq.jitter_min <= pix2seq.jitter_max"),
    ("pix2seq.noise_bbox_weight", lambda v: v >= 0, ">= 0"), ("pix2seq.eos_token_weight", lambda v: v >= 0, ">= 0"),
    ("pix2seq.top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("pix2seq.temperature", lambda v: v > 0, "> 0"),
    ("pix2seq.tasks", lambda v: _words(v) is not None, f"a comma list of {one_of(PIX2SEQ_TASKS)}"),
    ("pix2seq", lambda o: _task_weights_ok(o.tasks, o.task_weights),
     "pix2seq.task_weights empty or one number >= 0 per task of pix2seq.tasks"),
    ("pix2seq.seg_max_instances", lambda v: v >= 1, ">= 1"), ("pix2seq.seg_max_points", lambda v: v >= 3, ">= 3"),
    ("pix2seq.seg_samples", lambda v: v >= 1, ">= 1"), ("pix2seq.seg_top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("pix2seq.seg_threshold", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pix2seq.kpt_max_instances", lambda v: v >= 1, ">= 1"), ("pix2seq.kpt_top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("pix2seq.cap_max_len", lambda v: v >= 2, ">= 2"), ("pix2seq.cap_input_drop", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pix2seq.cap_top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
]


def _words(spec: str) -> list[str] | None:
    """'det, seg' -> ['det', 'seg']; None when empty or a name is not a Pix2Seq task."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    return names if names and all(n in PIX2SEQ_TASKS for n in names) else None


def _task_weights_ok(tasks: str, spec: str) -> bool:
    if not spec.strip():
        return True
    try:
        w = [float(v) for v in spec.split(",")]
    except ValueError:
        return False
    names = _words(tasks)
    return names is None or (len(w) == len(set(names)) and all(math.isfinite(x) and x >= 0 for x in w))


def _is_regex(text: str) -> bool:
    import re

    try:
        re.compile(text)
    except re.error:
        return False
    return True


def validate(cfg: Config) -> Config:
    """Raise ConfigError for a word outside its vocabulary or a value out of its range (checked before any work
    starts)."""
    return check_section(cfg, "")


def check_section(obj, section: str):
    """``validate`` for ``obj``, the config (``section`` "") or one of its sections built on its own (``section``
    its key, e.g. "pix2seq"): words of every vocabulary, then the ranges of its keys. Returns ``obj``."""
    prefix = f"{section}." if section else ""
    for key, (tp, value) in flat_keys(obj).items():
        words = literal_words(tp)
        if words and value is not None and value not in words:
            raise ConfigError(f"{prefix}{key}={value!r}: must be {one_of(words)}")
    for key, ok, need in _RANGES:
        if section and key != section and not key.startswith(prefix):
            continue
        value = obj
        for part in key[len(section):].lstrip(".").split(".") if key != section else ():
            value = getattr(value, part)
        if not ok(value):  # a rule across a section's keys names them in ``need``
            raise ConfigError(f"{key}: need {need}" if dataclasses.is_dataclass(value) else
                              f"{key}={value!r}: must be {need}")
    return obj


@dataclass(frozen=True)
class Resolved:
    """What a run's config means on this machine and data (``resolve``); recorded in config.json and every
    checkpoint as ``resolved`` (with the images, device and data fingerprint the engine adds)."""
    world_size: int
    effective_batch: int  # data.batch_size x processes x optim.accum_steps
    lr: float
    lr_rule: str  # how lr came about, e.g. 'lr 9.4e-06 = blr 0.00015 x batch 16 / 256'
    steps_per_epoch: int  # optimizer steps (whole accumulation cycles only)
    total_steps: int  # the lr schedule's length: epochs x steps_per_epoch, or run.max_steps when shorter
    warmup_steps: float


def resolve(cfg: Config, world: int, batches_per_epoch: int) -> Resolved:
    """Derive the run's numbers from ``cfg``, the number of processes and the full batches one process sees per
    epoch. Raises ValueError when an epoch holds fewer batches than one accumulation cycle."""
    o = cfg.optim
    accum = max(1, o.accum_steps)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{batches_per_epoch} batches per epoch is fewer than optim.accum_steps={accum}")
    total_steps = o.epochs * steps_per_epoch
    if cfg.run.max_steps:  # a shortened run still gets the whole warmup + cosine schedule
        total_steps = min(total_steps, cfg.run.max_steps)
    eff_batch = cfg.data.batch_size * world * accum
    if o.lr is not None:
        lr, rule = o.lr, f"lr {o.lr:.3g} (optim.lr)"
    else:
        lr = o.blr * eff_batch / 256
        rule = f"lr {lr:.3g} = blr {o.blr:g} x batch {eff_batch} / 256"
    return Resolved(world, eff_batch, lr, rule, steps_per_epoch, total_steps, o.warmup_epochs * steps_per_epoch)


def split_override(item: str) -> tuple[str, str]:
    """``"optim.blr=1e-4"`` -> ``("optim.blr", "1e-4")``."""
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


def flatten(d: dict, prefix: str = "") -> dict:
    """``{'model': {'name': x}}`` -> ``{'model.name': x}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
