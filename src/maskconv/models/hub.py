"""Self-describing weight folders and model sources, with or without timm installed.

``save_pretrained(model, DIR)`` writes ``config.json`` + ``model.safetensors`` in the layout timm's ``local-dir:``
/ ``hf-hub:`` loaders read (timm's ``save_for_hf`` schema: ``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg``), the architecture named ``maskconv_<name>`` (``maskconv.register_with_timm()`` makes timm
build it), plus a ``maskconv`` provenance block (version, model name, arguments, time, the caller's fields) that
timm ignores. ``from_pretrained(DIR)`` / ``create_model('local-dir:DIR', pretrained=True)`` read such a folder,
a folder timm wrote for a model maskconv also has (``convnextv2_atto``) and an HF transformers ConvNeXt (V2)
folder (the registered size with its depths and widths). ``hf-hub:org/name[@rev]`` reads the
same folder from the Hugging Face cache only: maskconv never downloads. ``save_transformers(model, DIR)`` writes
a ConvNeXt as an HF transformers folder (``ConvNextV2ForImageClassification.from_pretrained(DIR)``).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from ..fileio import atomic_write
from ._helpers import CheckpointError, save_weights
from ._timm import TIMM_BUILD_OPTIONS, default_pretrained_cfg, maskconv_name, timm_name

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_pretrained", "parse_source", "resolve_folder", "save_pretrained",
           "save_transformers", "weights_file"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# the weight files timm's local-dir loader looks for, in its order of preference (timm ``_hub._PREFERRED_FILES``)
_WEIGHT_FILES = (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_SOURCES = {"local-dir": "local-dir", "hf-hub": "hf-hub", "hf_hub": "hf-hub"}  # timm's, incl. its old alias


def parse_source(name: str) -> tuple[str | None, str]:
    """``'local-dir:DIR'`` -> ``('local-dir', 'DIR')``, ``'hf-hub:org/name'`` -> ``('hf-hub', 'org/name')``;
    anything else (a model name, a file path) -> ``(None, name)``."""
    prefix, sep, rest = str(name).partition(":")
    source = _SOURCES.get(prefix.lower()) if sep else None
    if source is None:
        return None, str(name)
    if not rest:
        raise ValueError(f"{name!r}: nothing after '{prefix}:' (a folder for local-dir:, a repo id for hf-hub:)")
    return source, rest


def resolve_folder(source: str, model_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder a source names: ``local-dir`` a directory, ``hf-hub`` ``repo[@revision]``'s snapshot in the
    Hugging Face cache (``cache_dir`` or the default cache; never a download)."""
    if source == "local-dir":
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"local-dir:{model_id}: no such directory")
        return folder
    if source != "hf-hub":
        raise ValueError(f"unknown model source {source!r}; use local-dir: or hf-hub:")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError("hf-hub: sources need huggingface_hub: pip install huggingface_hub") from e
    repo, _, revision = model_id.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        where = f" at {cache_dir}" if cache_dir else ""
        raise CheckpointError(f"hf-hub:{model_id} is not in the Hugging Face cache{where}; maskconv never downloads: "
                              f"fetch it first (`hf download {repo}`) or pass local-dir:<folder>") from None


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not a weights folder written by save_pretrained or "
                              "timm (a bare checkpoint file loads with create_model(name, pretrained=<file>))")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture", cfg.get("model_type")), str):
        raise CheckpointError(f"{path} names no 'architecture' (timm) or 'model_type' (HF transformers)")
    return cfg


def _timm_config_args(cfg: dict) -> tuple[str, dict]:
    """(architecture, build arguments) of a timm / save_pretrained ``config.json``."""
    pcfg = cfg.get("pretrained_cfg", cfg)  # timm's legacy configs are one flat dict
    args = dict(cfg.get("model_args") or {})
    if isinstance(cfg.get("num_classes"), int):
        args.setdefault("num_classes", cfg["num_classes"])
    if pcfg.get("input_size"):
        args.setdefault("in_chans", int(pcfg["input_size"][0]))
    return maskconv_name(cfg["architecture"]), args


def _hf_config_args(cfg: dict) -> tuple[str, dict]:
    """(maskconv name, build arguments) of an HF transformers ConvNeXt / ConvNeXt V2 ``config.json``: the registered
    size with the same depths and widths (the weights then load through the HF layout of ``convnext_layouts``)."""
    from ._registry import list_models, model_entrypoint

    family = {"convnext": "convnext_*", "convnextv2": "convnextv2_*"}.get(cfg.get("model_type"))
    if family is None:
        raise CheckpointError(f"HF transformers model_type {cfg.get('model_type')!r}: maskconv builds HF ConvNeXt / "
                              "ConvNeXt V2 folders; other HF weights load into a model you build "
                              "(load_checkpoint(model, 'local-dir:DIR'), e.g. ViT / ViTMAE)")
    want = (tuple(cfg.get("depths", ())), tuple(cfg.get("hidden_sizes", ())))
    for name in list_models(family, exclude_test=True):
        with torch.device("meta"):
            m = model_entrypoint(name)()
        if (m.depths, m.dims) == want:
            break
    else:
        raise CheckpointError(f"no maskconv {family[:-2]} size has depths {want[0]} and widths {want[1]}")
    heads = any(a.endswith("ForImageClassification") for a in cfg.get("architectures") or [])
    args = {"num_classes": len(cfg.get("id2label") or {}) if heads else 0, "in_chans": int(cfg.get("num_channels", 3))}
    if cfg.get("patch_size", 4) != 4:
        args["patch_size"] = int(cfg["patch_size"])
    return name, args


def weights_file(folder: str | os.PathLike) -> Path:
    """The weight file of a folder, by timm's order of preference (``model.safetensors`` first)."""
    folder = Path(folder)
    found = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder} holds no weights ({', '.join(_WEIGHT_FILES)})")
    return found


def create_model_from_source(name: str, pretrained: bool | str = False, cache_dir: str | os.PathLike | None = None,
                             **kwargs) -> nn.Module:
    """``create_model('local-dir:DIR' | 'hf-hub:org/name', pretrained=...)``, as timm: the folder's config builds
    the model (its ``model_args``, class count and input channels; ``kwargs`` override them) and
    ``pretrained=True`` loads its weights, strictly (``load_checkpoint``)."""
    from ._registry import create_model, is_model

    source, model_id = parse_source(name)
    if not isinstance(pretrained, bool):
        raise ValueError(f"{name!r} names the weights already: pass pretrained=True (or False for the architecture "
                         f"alone), not pretrained={pretrained!r}")
    folder = resolve_folder(source, model_id, cache_dir)
    cfg = _read_config(folder)
    arch, args = _timm_config_args(cfg) if "architecture" in cfg else _hf_config_args(cfg)
    if not is_model(arch):
        raise CheckpointError(f"{folder / CONFIG_NAME} names architecture {cfg['architecture']!r}, which maskconv does "
                              "not have (see maskconv.list_models())")
    args.update({k: v for k, v in kwargs.items() if v is not None})  # the caller's arguments win, as in timm
    try:
        return create_model(arch, pretrained=str(weights_file(folder)) if pretrained else False, **args)
    except TypeError as e:  # a model_args entry the maskconv constructor does not take (a timm-only option)
        raise CheckpointError(f"{folder / CONFIG_NAME}: model_args {sorted(args)} do not fit maskconv's {arch}: {e}") from None


def from_pretrained(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build and load the model saved in a folder (``save_pretrained``, or timm's ``save_for_hf`` for a model
    maskconv has); ``source`` is a folder, ``local-dir:DIR`` or ``hf-hub:org/name``. ``kwargs`` as ``create_model``."""
    if parse_source(str(source))[0] is None:
        source = f"local-dir:{source}"
    return create_model_from_source(str(source), pretrained=True, cache_dir=cache_dir, **kwargs)


def _architecture(model: nn.Module) -> tuple[str, dict]:
    """(maskconv name, build arguments) of a model built by ``maskconv.create_model`` or timm's ``maskconv_*``."""
    from ._registry import is_model

    if not hasattr(model, "forward_head"):  # e.g. timm's features_only wrapper (its keys are 'model.*')
        raise ValueError(f"save_pretrained saves a whole model; this {type(model).__name__} is not one (a features_only "
                         "wrapper: save the model it wraps)")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch and "model_kwargs" in cfg:  # maskconv.create_model
        return arch, dict(cfg["model_kwargs"])
    if arch and arch.startswith("maskconv_") and is_model(maskconv_name(arch)):  # timm.create_model('maskconv_*')
        args = {k: v for k, v in getattr(model, "_model_args", {}).items() if k not in TIMM_BUILD_OPTIONS}
        return maskconv_name(arch), args
    raise ValueError(f"save_pretrained needs a model built by maskconv.create_model (or timm's maskconv_* names); "
                     f"this {type(model).__name__} does not say which architecture it is")


def save_pretrained(model: nn.Module, directory: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (timm's ``local-dir:`` / HF-hub folder
    layout) and return it. ``provenance``: extra JSON fields recorded under ``config['maskconv']`` (e.g. the run's
    config, data, commit) next to the maskconv version, model name and build arguments.

    An existing ``config.json`` is removed first, so a crash part-way leaves a folder that loaders refuse (no
    config) rather than new weights under an old config."""
    from .. import __version__

    name, args = _architecture(model)
    try:
        json.dumps(args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_pretrained: the build arguments {sorted(args)} are not JSON ({e})") from None
    pcfg = default_pretrained_cfg(model, timm_name(name))
    pcfg.pop("architecture")
    grid, patch = getattr(model, "pos_grid", None), getattr(model, "patch_size", None)
    if grid is not None and patch is not None:  # a ViT's stored position table is for this input size
        pcfg["input_size"] = (model.in_chans, grid[0] * patch, grid[1] * patch)
    record = {"version": __version__, "model": name, "model_args": args,
              "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
    config = {"architecture": timm_name(name), "num_classes": model.num_classes, "num_features": model.num_features,
              "global_pool": getattr(model, "global_pool", "avg"), "model_args": args, "pretrained_cfg": pcfg,
              "maskconv": record}
    try:
        text = json.dumps(config, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_pretrained: provenance must be JSON ({e})") from None
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    save_weights(model, folder / WEIGHTS_NAME, metadata={"maskconv_version": __version__, "model_args": json.dumps(args)})
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return folder


def save_transformers(model: nn.Module, directory: str | os.PathLike, label_names: list[str] | None = None) -> Path:
    """Write a ConvNeXt V1 / V2 as an HF transformers folder (``config.json`` + ``model.safetensors``) that
    ``ConvNextV2ForImageClassification`` (V1: ``ConvNextForImageClassification``) ``.from_pretrained`` reads; the
    weights also load back into maskconv (``load_checkpoint``, HF layout). Layout: ``convnext_layouts.to_hf``."""
    from .. import __version__
    from .convnext import ConvNeXt
    from .convnext_layouts import to_hf

    if not isinstance(model, ConvNeXt):
        raise ValueError(f"save_transformers writes HF's ConvNeXt / ConvNeXt V2 layout; got a {type(model).__name__}")
    sd, config = to_hf(model, label_names)
    config["maskconv"] = {"version": __version__, "model": getattr(model, "pretrained_cfg", {}).get("architecture")}
    text = json.dumps(config, indent=2)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # as save_pretrained: never new weights under an old config
    save_weights(sd, folder / WEIGHTS_NAME)
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return folder
