"""The CLI end to end (it only parses and runs the commands of cli.COMMANDS)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from maskconv.cli import main
from maskconv.pretrain import create_objective, save_objective


def test_models_lists_params_and_macs(capsys):
    assert main(["models", "convnextv2_at*"]) == 0
    out = capsys.readouterr().out
    assert "| convnextv2_atto | 3.71 | 0.55 |" in out  # README: 3.7M params, 0.55G FLOPs (MACs)
    assert main(["models", "nothing_*"]) == 2


def test_visualize_recon_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    ckpt = save_objective(obj, tmp_path / "run" / "fcmae.safetensors")
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8)).save(imgs / "sub" / "b.jpg")  # grayscale
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "recon.png"
    assert main(["visualize", "recon", "--checkpoint", str(ckpt), "--images", str(imgs), "--out", str(out),
                 "--size", "64"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # 2 rows x 4 columns
    assert main(["visualize", "recon", "--checkpoint", str(imgs / "a.png"), "--images", str(imgs),
                 "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def test_reconstruction_pastes_prediction_only_on_hidden_patches():
    from maskconv.viz.reconstruction import reconstruct

    obj = create_objective("fcmae", model="test_convnextv2", decoder_dim=16)
    x = torch.randn(2, 3, 64, 64)
    r = reconstruct(obj, x)
    hidden = r["mask"].repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand_as(x)
    assert torch.equal(r["pasted"][~hidden], x[~hidden]) and torch.equal(r["pasted"][hidden], r["pred"][hidden])
    assert (r["masked"][hidden] == 0).all()


def test_python_dash_m_runs_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "maskconv", "models", "convnext_atto"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "convnext_atto" in res.stdout


def test_collapse_metric_extremes():
    from maskconv.viz.collapse import pairwise_cosine_distance as _pairwise_cosine_distance

    same = torch.randn(1, 4, 4, 1).expand(1, 4, 4, 6)  # (B, H, W, C): 6 identical channels
    assert _pairwise_cosine_distance(same).item() == pytest.approx(0.0, abs=1e-6)
    ortho = torch.zeros(1, 1, 2, 2)
    ortho[0, 0, 0, 0] = ortho[0, 0, 1, 1] = 1.0  # 2 orthogonal channels: off-diagonal pairs 0.5, diagonal 0
    assert _pairwise_cosine_distance(ortho).item() == pytest.approx(0.25)
    opposite = torch.cat([same[..., :1], -same[..., :1]], dim=-1)
    assert _pairwise_cosine_distance(opposite).item() == pytest.approx(0.5)


def test_visualize_collapse_cli_on_run_and_random(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "pre"
    assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(run),
                 "data.img_size=64", "data.batch_size=16", "data.num_workers=0", "optim.epochs=1",
                 "run.progress=false", "objective.decoder_dim=16"]) == 0
    out = tmp_path / "collapse.png"
    assert main(["visualize", "collapse", "--checkpoint", str(run), "--checkpoint", str(run / "encoder.safetensors"),
                 "--model", "test_convnextv2", "--images", "synthetic", "--out", str(out), "--size", "64",
                 "--limit", "8", "--where", "mlp"]) == 0
    import json

    res = json.loads(out.with_suffix(".json").read_text())
    assert sorted(res) == ["encoder.safetensors", "pre"]  # both checkpoints, labelled by file / run name
    for rows in res.values():
        assert len(rows) == 5 and all(0.0 <= r["distance"] <= 1.0 for r in rows)
    assert out.is_file()
