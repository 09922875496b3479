"""What a CLI command is (``Command``) and the flags every training command shares.

A command's room (the module whose function it runs) declares ``COMMAND = Command(help, add_arguments, run)``
at its bottom; ``cli.COMMANDS`` lists them. Training flags are generated from the config dataclasses
(``--optim.blr 1e-4`` or ``optim.blr=1e-4``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    """One ``maskconv <name>`` command: its one-line help, how it declares its arguments on its own parser, and
    what it runs with the parsed arguments (an exit status, or None for 0)."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], "int | None"]
    description: str | None = None  # the command's --help text (default: ``help``)


# Short flags for the keys every run sets.
ALIASES = {"--model": "model.name", "--data": "data.path", "--out": "run.out", "--init": "model.init",
           "--objective": "objective.name"}
TRAINING = ("pretrain", "finetune", "linprobe")  # the commands whose recipe names its task
# finetune's augmentation-library keys (data.augment_lib=timm and what only timm's pipeline reads)
_TIMM_AUGMENT = ("data.augment_lib", "data.auto_augment", "data.color_jitter", "data.interpolation", "data.remode",
                 "data.recount", "data.mixup_prob", "data.mixup_switch_prob", "data.mixup_mode")
# Config keys a task never reads (a section name = all its keys); a new key is listed for every task until named
# here. Pretraining has no labels or classifier; linear probing trains only the probe, on
# crops + flips (MAE's weak augmentation). A
# section named as a task (pix2seq) holds that task's own settings: no other task reads it.
UNUSED = {
    "pretrain": ("pix2seq", "model.global_pool", "model.head_init_scale", "data.labels_per_class", "data.rand_augment",
                 "data.reprob", "data.mixup", "data.cutmix", "data.label_smoothing", "optim.layer_decay",
                 "optim.layer_decay_scheme", *_TIMM_AUGMENT),
    "finetune": ("objective", "pix2seq"),
    "linprobe": ("objective", "pix2seq", "dynamic_sparsity", "model.drop_path_rate", "model.head_init_scale",
                 "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix",
                 "optim.layer_decay", "optim.layer_decay_scheme", *_TIMM_AUGMENT),
    # pix2seq: its own transform (scale jitter and flips from pix2seq.*), no classifier, no masking
    "pix2seq": ("objective", "model.global_pool", "model.head_init_scale", "data.labels_per_class", "data.val_fraction",
                "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix", "data.label_smoothing",
                "data.crop_scale_min", "data.hflip", "data.mean", "data.std", *_TIMM_AUGMENT),
    # detect / segment: their own box- and mask-aware transform (heads/task.py), no classifier, no masking
    "detect": ("objective", "pix2seq", "model.global_pool", "model.head_init_scale", "data.labels_per_class", "data.val_fraction",
               "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix", "data.label_smoothing",
               "data.crop_scale_min", "data.hflip", "data.mean", "data.std", *_TIMM_AUGMENT),
    "segment": ("objective", "pix2seq", "model.global_pool", "model.head_init_scale", "data.labels_per_class",
                "data.val_fraction", "data.rand_augment", "data.reprob", "data.mixup", "data.cutmix",
                "data.label_smoothing", "data.crop_scale_min", "data.hflip", "data.mean", "data.std", *_TIMM_AUGMENT),
}


def field_docs() -> dict[str, str]:
    """``{'optim.blr': 'base lr for an effective batch of 256', ...}`` from the comments in config.py: a field's
    own end-of-line comment, else the comment line(s) right above it; a field without either has no entry."""
    import inspect
    import io
    import tokenize

    from . import config

    src = inspect.getsource(config)
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    sections = {f.name: type(f.default_factory()).__name__ for f in config.dataclasses.fields(config.Config)
                if f.default_factory is not config.dataclasses.MISSING}
    docs, cls = {}, None
    for i, line in enumerate(lines, start=1):
        if line.startswith("class "):
            cls = line[len("class "):].split("(")[0].split(":")[0]
            continue
        if cls is None or not line.startswith("    ") or ":" not in line or line.strip().startswith(("#", '"')):
            continue
        name = line.strip().split(":")[0]
        if not name.isidentifier():
            continue
        text = comments.get(i)
        j = i - 1
        while text is None and j in comments and lines[j - 1].strip().startswith("#"):  # a block above the field
            text = comments[j]
            j -= 1
        section = next((k for k, v in sections.items() if v == cls), None)
        if text and section:
            docs[f"{section}.{name}"] = text
    return docs


def task_keys(task: str) -> list[str]:
    """The config keys ``task`` reads (every key but those listed in ``UNUSED[task]``)."""
    from .config import flat_keys

    skip = UNUSED.get(task, ())
    return [k for k in flat_keys() if k != "task" and k not in skip and k.split(".")[0] not in skip]


def recipe_names(task: str | None = None) -> list[str]:
    """Packaged recipe names (``task``: only the recipes of that task)."""
    from pathlib import Path

    import yaml

    out = []
    for f in sorted((Path(__file__).parent / "recipes").glob("*.yaml")):
        if task is None or (yaml.safe_load(f.read_text()) or {}).get("task", "pretrain") == task:
            out.append(f.stem)
    return out


def add_config_flags(p: argparse.ArgumentParser, task: str) -> None:
    from .config import REPLACED, flat_keys, literal_words, old_keys

    docs, types = field_docs(), flat_keys()
    names = ", ".join(recipe_names(task)) or "none packaged yet"
    p.add_argument("--recipe", help=f"YAML recipe: a file, or a packaged {task} recipe ({names})")
    for flag, key in ALIASES.items():
        if key in task_keys(task):
            p.add_argument(flag, dest=key, default=None, help=f"{docs.get(key, key)} (= --{key})")
    groups = {}
    for key in task_keys(task):
        if key in ALIASES.values():
            continue
        section = key.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section}.* options")
        tp, default = types[key]
        kind = " | ".join(literal_words(tp)) or getattr(tp, "__name__", str(tp)).replace("typing.", "")
        desc = docs.get(key)
        # the task's own section (pix2seq.*) also goes by bare flags: --max-objects = --pix2seq.max_objects
        short = [f"--{key.split('.', 1)[1].replace('_', '-')}"] if section == task else []
        groups[section].add_argument(f"--{key}", *short, dest=key, default=None, metavar="V",
                                     help=f"{desc + '. ' if desc else ''}{kind}, default {default!r}")
    for old in (*old_keys(), *REPLACED):  # still accepted (set_key says it is renamed / replaced), not shown
        p.add_argument(f"--{old}", dest=old, default=None, help=argparse.SUPPRESS)
    p.add_argument("--allow-config-change", action="store_true", default=None, dest="run.allow_config_change",
                   help="resume a run with other training settings, recording the change and its step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=5")


def config_from_args(args) -> "Config":  # noqa: F821
    from .config import ConfigError, load_config, set_key, split_override, validate

    cfg = load_config(args.recipe, args.overrides)
    if args.recipe and args.command in UNUSED and cfg.task != args.command:
        run = f"maskconv {cfg.task}" + (" train" if cfg.task not in TRAINING else "")
        raise ConfigError(f"recipe {args.recipe!r} is a {cfg.task} recipe; run it with `{run}`")
    given = {split_override(o)[0] for o in args.overrides}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            if key in given:  # which one wins would depend on argparse internals: say so instead
                flag = next((f for f, k in ALIASES.items() if k == key), f"--{key}")
                raise ConfigError(f"{key} is given twice ({flag} {value} and {key}=...): give it once")
            set_key(cfg, key, value)
    if args.command in UNUSED:  # config.json records the task that ran
        cfg.task = args.command
    return validate(cfg)


def training_command(task: str, help: str, run: Callable) -> Command:
    """The command of a training task: every config key it reads as a flag, ``run(cfg)`` on the parsed config."""
    def _run(args: argparse.Namespace) -> None:
        run(config_from_args(args))

    return Command(help, lambda p: add_config_flags(p, task), _run,
                   description=f"{help}. Options not listed here are not read by {task}.")
