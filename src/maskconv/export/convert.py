"""ONNX / torch.export files of a model, reloaded and checked against PyTorch on a random input.

ONNX goes through torch's default (dynamo, ``torch.export``-based) exporter, which needs ``onnxscript``; the
legacy TorchScript exporter is deprecated (see docs/DECISIONS.md). onnx, onnxscript and onnxruntime are the
``export`` extra and are imported lazily. Files are written atomically: into a temporary folder beside the
target, reloaded and checked there, and renamed only when they pass (an ONNX file over 2 GB keeps its weights in
``<name>.data`` beside it, renamed first), so a failed check never replaces an existing file.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..fileio import replace_durably
from .reparam import reparameterize_model

FORMATS = ("onnx", "torch-export")
# Parity bound on max |exported - PyTorch|, relative to the output's scale (max(1, max |output|)). The file runs
# other fp32 kernels than eager PyTorch (onnxruntime's conv algorithms, fused LayerNorm/GELU; BN folded into
# convs by --reparam), so sums are rounded in another order: measured <= 1.2e-6 relative on convnextv2_tiny,
# slak_tiny, replknet_31b and vit_small at 224 px (BENCHMARKS.md). Rounding grows with depth and resolution
# (reordering alone moves convnextv2_huge's logits by ~1.3e-5, docs/DECISIONS.md), hence 1e-4; a real mismatch
# (a wrong weight, a dropped branch or BN, a wrong op) moves outputs by >= 1e-2 relative and still fails.
RTOL = 1e-4


@dataclass
class ExportReport:
    """What was written and how closely the reloaded file matches PyTorch."""

    path: str
    format: str
    input_shape: tuple[int, ...]
    max_abs_diff: float  # reloaded file vs. the PyTorch model as given (before any reparameterization)
    tolerance: float
    reparam_max_abs_diff: float | None  # reparameterized PyTorch model vs. the model as given
    dynamic_batch: bool
    export_s: float
    size_mb: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rep = "" if self.reparam_max_abs_diff is None else f", reparam vs original {self.reparam_max_abs_diff:.3g}"
        return (f"{self.format} -> {self.path} ({self.size_mb:.1f} MB, {self.export_s:.1f} s): max |diff| vs PyTorch "
                f"{self.max_abs_diff:.3g} on a random {tuple(self.input_shape)} input (tolerance {self.tolerance:.3g}"
                f"{rep})")


def _input_shape(model: nn.Module, input_size, batch: int) -> tuple[int, int, int, int]:
    """``input_size``: H (square), (H, W), (C, H, W) or (B, C, H, W) -> (B, C, H, W)."""
    size = (input_size,) if isinstance(input_size, int) else tuple(input_size)
    if not size or not all(isinstance(s, int) and s > 0 for s in size) or len(size) > 4:
        raise ValueError(f"input_size={input_size!r}: give H, (H, W), (C, H, W) or (B, C, H, W) as positive ints")
    if len(size) == 1:
        size = size * 2
    if len(size) == 2:
        size = (getattr(model, "in_chans", 3),) + size
    if len(size) == 3:
        size = (batch,) + size
    return size


def _replace_from_dir(tmpdir: Path, path: Path) -> None:
    """Move ``tmpdir/<path.name>`` and its side files (ONNX external data) beside ``path``, the main file last."""
    for f in sorted(tmpdir.iterdir()):
        if f.name != path.name:
            os.replace(f, path.parent / f.name)
    replace_durably(tmpdir / path.name, path)


def _atomic_export(path: Path, write_fn, check_fn=None):
    """``write_fn(tmp)`` then ``check_fn(tmp)`` (may raise) on a file in a temporary folder beside ``path``; only
    when both succeed is it renamed to ``path``. Returns what ``check_fn`` returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name  # the final name, so an ONNX external-data reference stays valid
        write_fn(tmp)
        result = check_fn(tmp) if check_fn is not None else None
        _replace_from_dir(tmpdir, path)
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _import_onnx_tools():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the 'export' extra ({e.name} is missing): "
                          "pip install 'maskconv[export]'") from e
    return onnxruntime


def _trace_onnx(model, x, dynamic_shapes):
    """The ONNX program of ``model`` on ``x``; returns its ``save(path)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch), not about our model
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True,
                                    verbose=False)
    return program.save


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = _import_onnx_tools()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out, *_) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _trace_pt2(model, x, dynamic_shapes):
    """The ``torch.export`` program of ``model`` on ``x``; returns its ``save(path)``."""
    program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    return lambda path: torch.export.save(program, path)


def _run_pt2(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(path)).module()(x)


def export_model(model: nn.Module, path: str | os.PathLike, format: str = "onnx", input_size=224,
                 reparam: bool = False, dynamic_batch: bool = True, rtol: float = RTOL, seed: int = 0,
                 verbose: bool = False) -> ExportReport:
    """Write ``model`` as ONNX (``format='onnx'``) or a ``torch.export`` program (``'torch-export'``, a .pt2
    file), reload the file, run it and PyTorch on the same random input and return an ``ExportReport``.

    ``input_size``: H, (H, W), (C, H, W) or (B, C, H, W). ``reparam``: merge re-parameterizable branches
    (``reparameterize_model``) in a copy before exporting; the check still compares with ``model`` as given.
    ``dynamic_batch``: the batch dimension stays symbolic (the check then runs at batch 2).
    Raises ``ValueError`` for a bad format/size and ``RuntimeError`` if the outputs differ by more than
    ``rtol · max(1, max |output|)``; then nothing is written (a file already at ``path`` stays as it was).
    ``model`` is left unchanged (its train/eval mode included); a model on an accelerator is exported from a
    CPU copy.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "onnx":
        _import_onnx_tools()  # fail before any work if the extra is missing
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the file to write (e.g. {path / 'model.onnx'})")
    if format == "torch-export" and path.suffix != ".pt2":
        raise ValueError(f"{path}: a torch.export program must be saved as a .pt2 file (torch.export.load reads "
                         "only those)")
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        # export and check on CPU (onnxruntime runs on CPU here); the caller's model stays where it is
        model = copy.deepcopy(model).cpu()
    shape = _input_shape(model, input_size, batch=2 if dynamic_batch else 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    check = getattr(model, "check_input", None)
    if check is not None:
        check(x)  # e.g. a size the strides do not divide: a clear message before tracing
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
        target = model
        rep_diff = None
        tol = rtol * max(1.0, ref.abs().max().item())
        if reparam:
            target = reparameterize_model(copy.deepcopy(model))
            with torch.no_grad():
                rep_diff = (target(x) - ref).abs().max().item()
            if not rep_diff <= tol:  # also catches NaN; nothing exported
                raise RuntimeError(f"reparameterized model does not match the original: max |diff| {rep_diff:.3g} "
                                   f"on a random {tuple(shape)} input (tolerance {tol:.3g})")
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        t0 = time.perf_counter()
        with torch.no_grad():  # trace the inference path (layers may pick another kernel when grads are on)
            save = (_trace_onnx if format == "onnx" else _trace_pt2)(target, x, dyn)

        def verify(tmp: Path) -> ExportReport:  # the written file, before it replaces anything at ``path``
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                out = (_run_onnx if format == "onnx" else _run_pt2)(tmp, x)
            if out.shape != ref.shape:
                raise RuntimeError(f"{path}: output shape {tuple(out.shape)} differs from PyTorch's "
                                   f"{tuple(ref.shape)}")
            diff = (out.float() - ref.float()).abs().max().item()
            data = tmp.with_name(tmp.name + ".data")  # ONNX external weights, only for > 2 GB models
            size_mb = (tmp.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20
            report = ExportReport(str(path), format, tuple(shape), diff, tol, rep_diff, dynamic_batch, seconds,
                                  size_mb)
            if verbose:
                print(report)
            if not diff <= tol:  # also catches NaN
                raise RuntimeError(f"exported model does not match PyTorch (nothing written): {report}")
            return report

        return _atomic_export(path, save, verify)
    finally:
        model.train(was_training)
