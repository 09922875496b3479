"""`export` of a trained run: the exact model rebuilt from the run's config, the preprocessing written beside it,
random weights refused unless asked."""
import json

import numpy as np
import pytest
import torch

from maskconv.cli import main

ort = pytest.importorskip("onnxruntime")


def _gray_folder(root, n_per_class=6, seed=0):
    """train/ and val/ with two classes a small model separates quickly: dark vs bright, of varied sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, base in (("dark", 60), ("bright", 190)):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                h, w = rng.integers(30, 48, 2)
                a = np.clip(base + rng.normal(0, 40, (h, w)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


def _finetune(tmp_path, *extra):
    data, run = _gray_folder(tmp_path / "data"), tmp_path / "ft"
    assert main(["finetune", "--model", "test_convnextv2", "--data", str(data), "--out", str(run),
                 "model.stem_stride=2", "model.in_chans=1", "data.img_size=32", "data.batch_size=4",
                 "data.num_workers=0", "optim.epochs=2", "optim.lr=2e-3", "run.progress=false", *extra]) == 0
    return data, run


def test_export_run_folder_matches_pytorch_eval_through_written_preprocessing(tmp_path, capsys):
    from PIL import Image

    from maskconv.data.build import build_transform
    from maskconv.data.datasets import decode_image
    from maskconv.export.preprocess import apply_preprocessing
    from maskconv.rebuild import load_trained

    data, run = _finetune(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    spec = json.loads((tmp_path / "m.preprocessing.json").read_text())
    assert spec["input_size"] == [1, 32, 32] and spec["channels"] == 1 and spec["mean"] == [0.5]

    trained = load_trained(run)  # PyTorch, through the training pipeline (decoder + eval transform)
    net, cfg = trained.model, trained.config
    assert net.stride == 16 and net.in_chans == 1 and net.num_classes == 2  # stem stride 2 (x8), one channel
    tf = build_transform(cfg.data, 1, train=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    files = sorted((data / "val").rglob("*.png"))
    labels = torch.tensor([["bright", "dark"].index(f.parent.name) for f in files])
    with torch.no_grad():
        ref = net(torch.stack([tf(decode_image(f, 1)) for f in files]))
    # the deployment side: PIL + the JSON only
    x = torch.stack([apply_preprocessing(spec, torch.from_numpy(np.array(Image.open(f).convert("L")))[None])
                     for f in files])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    logits = torch.from_numpy(logits)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    acc_onnx = (logits.argmax(1) == labels).float().mean().item()
    acc_torch = (ref.argmax(1) == labels).float().mean().item()
    assert acc_onnx == acc_torch

    # a weights file inside the run folder rebuilds the same model; random weights are refused unless asked
    assert main(["export", "--checkpoint", str(run / "model.safetensors"), "--format", "torch-export",
                 "--out", str(tmp_path / "m.pt2")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), ref, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["export", "--model", "test_convnextv2", "--format", "onnx", "--out", str(tmp_path / "r.onnx")]) == 2
    assert "--random-weights" in capsys.readouterr().err and not (tmp_path / "r.onnx").exists()
    assert main(["export", "--model", "test_convnextv2", "--random-weights", "--format", "torch-export",
                 "--out", str(tmp_path / "r.pt2"), "--img-size", "64"]) == 0
