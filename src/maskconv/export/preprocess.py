"""The preprocessing an exported model expects, as a small JSON written beside the model file.

The steps are read from the evaluation transform training used (``data.build.build_transform(train=False)``),
so the file cannot drift from what the model was validated with. ``apply_preprocessing`` replays a spec on a
decoded image with torchvision's functional ops only: what a deployment has to reproduce, and how the export
test checks that the file is complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPEC_VERSION = 1
# channels -> how a decoded image is brought to them (data.datasets.to_channels)
COLOR = {1: "L: luminance 0.299 R + 0.587 G + 0.114 B of an RGB image (a gray image as is)",
         3: "RGB (a gray image repeated to 3 channels; alpha composited on white)"}


def preprocessing_spec(data_cfg, in_chans: int, size: tuple[int, int] | None = None) -> dict:
    """``{input_size, channels, color, divide_by, mean, std, steps}`` of the eval transform for ``data_cfg``.
    ``size``: a non-square (H, W) input replaces resize + crop by a warp to (H, W) (eval crops squares only)."""
    from torchvision.transforms import v2

    from ..data.build import build_transform

    tf = build_transform(data_cfg, in_chans, train=False)
    steps, mean, std, scale = [], None, None, None
    for t in tf.transforms:
        if isinstance(t, v2.Resize):
            to = list(t.size) if len(t.size) == 2 else int(t.size[0])
            steps.append({"op": "resize", "size": to, "interpolation": t.interpolation.value,
                          "antialias": bool(t.antialias),
                          "note": "an int resizes the shorter side to it, keeping the aspect ratio; [H, W] warps"})
        elif isinstance(t, v2.CenterCrop):
            steps.append({"op": "center_crop", "size": list(t.size)})
        elif isinstance(t, v2.ToDtype):
            scale = 255.0 if t.scale else 1.0
            steps.append({"op": "to_float", "divide_by": scale, "note": "uint8 0..255 -> float32 0..1 (a 16-bit gray image "
                          "into a 1-channel model: divide by 65535)"})
        elif isinstance(t, v2.Normalize):
            mean, std = list(t.mean), list(t.std)
            steps.append({"op": "normalize", "mean": mean, "std": std, "note": "(x - mean) / std per channel"})
        else:  # a new eval step must be described here before an export can promise the preprocessing
            raise NotImplementedError(f"cannot describe eval transform step {t!r} in the preprocessing file")
    h, w = size or (data_cfg.img_size, data_cfg.img_size)
    if h != w:
        steps = [s for s in steps if s["op"] not in ("resize", "center_crop")]
        steps.insert(0, {"op": "resize", "size": [h, w], "interpolation": "bicubic", "antialias": True,
                         "note": "non-square input: warped to [H, W]"})
    return {"version": SPEC_VERSION, "input_size": [in_chans, h, w], "layout": "NCHW float32",
            "channels": in_chans, "color": COLOR.get(in_chans, f"{in_chans} channels (gray/RGB channels cycled)"),
            "mean": mean, "std": std, "divide_by": scale, "steps": steps}


def write_preprocessing(spec: dict, model_path: str | Path) -> Path:
    """Write ``spec`` atomically as ``<model stem>.preprocessing.json`` beside the model file."""
    from ..fileio import atomic_write

    path = preprocessing_path(model_path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=1) + "\n"))
    return path


def preprocessing_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(f"{p.stem}.preprocessing.json")


def apply_preprocessing(spec: dict, image: torch.Tensor) -> torch.Tensor:
    """Replay ``spec`` on a decoded ``(C, H, W)`` uint8 image (already at ``spec['channels']``) -> (C, h, w)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x = image
    for s in spec["steps"]:
        if s["op"] == "resize":
            x = F.resize(x, s["size"], interpolation=InterpolationMode(s["interpolation"]), antialias=s["antialias"])
        elif s["op"] == "center_crop":
            x = F.center_crop(x, s["size"])
        elif s["op"] == "to_float":
            x = x.float() / s["divide_by"]
        elif s["op"] == "normalize":
            x = F.normalize(x, s["mean"], s["std"])
        else:
            raise ValueError(f"unknown preprocessing step {s['op']!r}")
    return x
