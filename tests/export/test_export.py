import pytest
import torch

from maskconv import create_model, list_models, save_weights
from maskconv.cli import main
from maskconv.export import export_model
from maskconv.export import convert
from tests.conftest import perturbed_state_dict

FAMILIES = list_models("test_*")  # every family's tiny variant, so new families are checked automatically
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}


def _input_size(model) -> int:
    return 2 * getattr(model, "stride", 32)  # a few output pixels: convs, attention and pooling all take part


# ONNX export costs ~3-5 s per tiny model (dynamo tracing + ONNX translation): one family in the default suite,
# every family with -m slow. torch.export (~2 s) runs for every family by default.
ONNX_FAST = "test_convnextv2"
CASES = [(n, "torch-export") for n in FAMILIES] + [
    pytest.param(n, "onnx", marks=() if n == ONNX_FAST else pytest.mark.slow) for n in FAMILIES]


@pytest.mark.parametrize("name, fmt", CASES)
def test_export_parity_every_family(tmp_path, name, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model = create_model(name).train()
    report = export_model(model, tmp_path / f"m{SUFFIX[fmt]}", fmt, _input_size(model))
    assert (tmp_path / f"m{SUFFIX[fmt]}").is_file() and report.size_mb > 0
    assert report.max_abs_diff <= report.tolerance and report.input_shape[0] == 2  # dynamic batch checked at 2
    assert model.training  # the caller's model is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{SUFFIX[fmt]}"]  # no temp files left behind
    # the batch dimension stays symbolic: another batch size runs and matches too
    x = torch.randn(3, 3, _input_size(model), _input_size(model))
    run = convert._run_onnx if fmt == "onnx" else convert._run_pt2
    with torch.no_grad():
        out, ref = run(tmp_path / f"m{SUFFIX[fmt]}", x), model.eval()(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= report.tolerance


def test_parity_check_can_fail(tmp_path, monkeypatch):
    real = convert._run_pt2
    monkeypatch.setattr(convert, "_run_pt2", lambda path, x: real(path, x) + 1e-2)  # a file that is slightly wrong
    (tmp_path / "m.pt2").write_bytes(b"a good export from before")
    with pytest.raises(RuntimeError, match="does not match PyTorch"):
        export_model(create_model("test_convnext"), tmp_path / "m.pt2", "torch-export", 64)
    # the failed file never replaced the existing one, and no temporary folder is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    assert (tmp_path / "m.pt2").read_bytes() == b"a good export from before"


def _perturb(model: torch.nn.Module) -> None:
    """Noise on every weight (layer scale 1e-6 would otherwise mute the merged branches) and non-trivial BN
    statistics and affine terms, so a wrong fold cannot hide behind mean 0 / var 1."""
    model.load_state_dict(perturbed_state_dict(model))
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def _count_convs(path) -> int:
    graph = torch.export.load(str(path)).graph
    return sum(1 for n in graph.nodes if n.op == "call_function" and "conv" in str(n.target))


@pytest.mark.parametrize("name", ["test_slak", "test_replknet"])
def test_reparam_export_merges_branches_and_matches(tmp_path, name):
    model = create_model(name)
    _perturb(model)
    keys = list(model.state_dict())
    merged = export_model(model, tmp_path / "merged.pt2", "torch-export", _input_size(model), reparam=True)
    assert merged.reparam_max_abs_diff is not None and merged.reparam_max_abs_diff <= merged.tolerance
    assert merged.max_abs_diff <= merged.tolerance
    # branches were merged: the file calls fewer convolutions than the training-time model has conv modules
    assert _count_convs(tmp_path / "merged.pt2") < sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert list(model.state_dict()) == keys  # the merge happened on a copy


def test_bad_arguments_are_clear_errors(tmp_path):
    model = create_model("test_convnext")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ValueError, match="input_size"):
        export_model(model, tmp_path / "m.pt2", "torch-export", (0, 64))
    with pytest.raises(ValueError, match="divisible"):
        export_model(model, tmp_path / "m.pt2", "torch-export", 50)
    with pytest.raises(ValueError, match=r"\.pt2 file"):
        export_model(model, tmp_path / "m.pt", "torch-export", 64)
    with pytest.raises(ValueError, match="is a folder"):
        export_model(model, tmp_path, "torch-export", 64)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # import onnxscript now fails
    with pytest.raises(ImportError, match=r"maskconv\[export\]"):
        export_model(create_model("test_convnext"), tmp_path / "m.onnx", "onnx", 64)


def test_atomic_write_moves_side_files_and_cleans_up(tmp_path):
    def write(p):  # like ONNX > 2 GB: the model plus its external weights beside it
        p.write_bytes(b"model")
        p.with_name(p.name + ".data").write_bytes(b"weights")

    convert._atomic_export(tmp_path / "m.onnx", write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]

    def crash(p):
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        convert._atomic_export(tmp_path / "other.onnx", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing half-written


def test_export_cli_with_checkpoint(tmp_path, capsys):
    trained = create_model("test_convnextv2", num_classes=5)
    ckpt = save_weights(trained, tmp_path / "w.safetensors")
    out = tmp_path / "m.pt2"
    assert main(["export", "--model", "test_convnextv2", "--checkpoint", str(ckpt), "--format", "torch-export",
                 "--out", str(out), "--img-size", "64", "96"]) == 0
    assert "max |diff| vs PyTorch" in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():  # the file holds the checkpoint's weights and its 5-class head
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), trained.eval()(x))


def test_export_cli_errors(tmp_path, capsys):
    base = ["export", "--model", "test_convnext", "--out", str(tmp_path / "m.pt2"), "--img-size", "64"]
    assert main(base + ["--format", "tflite"]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err
    assert main(base + ["--format", "torch-export", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
