import json

import pytest
import torch

from maskconv import create_model, list_models, save_weights
from maskconv.cli import main
from maskconv.viz.erf import erf_map, high_contribution_area


def _square_map(size: int, side: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(size, size)
    c, h = size // 2, side // 2
    m[c - h: c + h + 1, c - h: c + h + 1] = value
    return m


@pytest.mark.parametrize("value", [1.0, 37.5])  # log10(x+1)/max keeps a uniform square uniform at any scale
def test_area_of_a_uniform_square_is_exact(value):
    # share of a centred (2i+1)-square inside a uniform 21-square: (2i+1)^2 / 441, first one above t wins:
    # t=0.2 -> 11 (121/441=.27; 9 gives .18), 0.3 -> 13 (.38; 11 gives .27), 0.5 -> 15 (.51; 13 gives .38), 0.99 -> 21
    rows = high_contribution_area(_square_map(64, 21, value))
    assert [r["t"] for r in rows] == [0.2, 0.3, 0.5, 0.99]
    assert [r["side"] for r in rows] == [11, 13, 15, 21]
    assert [r["area_ratio"] for r in rows] == [s * s / 64**2 for s in (11, 13, 15, 21)]


def test_area_needs_the_whole_map_when_mass_is_at_the_border():
    m = torch.zeros(32, 32)
    m[0, 0] = 1.0  # all the mass in a corner: only the square covering everything holds it
    assert high_contribution_area(m, (0.5,)) == [dict(t=0.5, side=32, area_ratio=1.0)]


@pytest.mark.parametrize("bad, match", [(torch.zeros(8, 8), "all zero"), (-torch.ones(8, 8), "non-negative"),
                                        (torch.ones(2, 8, 8), "H, W")])
def test_area_rejects_bad_maps(bad, match):
    with pytest.raises(ValueError, match=match):
        high_contribution_area(bad)
    with pytest.raises(ValueError, match="threshold"):
        high_contribution_area(torch.ones(8, 8), (1.5,))


def _erf_ratios(kernel_size: int, x: torch.Tensor) -> list[float]:
    torch.manual_seed(0)  # same init stream for both kernels
    # V2 blocks: no layer scale, so random-init blocks contribute (V1's 1e-6 layer scale would hide them)
    model = create_model("test_convnextv2", kernel_size=kernel_size, num_classes=0)
    return [r["area_ratio"] for r in high_contribution_area(erf_map(model, x))]


def test_larger_kernel_gives_a_wider_erf():
    # 160 px: a 5x5 last map (odd), where the central pixel is the official one (even sides average the middle)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    small, large = _erf_ratios(3, x), _erf_ratios(13, x)
    assert all(b > a for a, b in zip(small, large)), (small, large)


def test_batched_erf_equals_one_image_at_a_time():
    model = create_model("test_convnextv2", num_classes=0).train()
    x = torch.randn(3, 3, 64, 64)
    batched = erf_map(model, x, batch_size=3)
    single = torch.stack([erf_map(model, x[i: i + 1]) for i in range(3)]).mean(0)
    assert batched.shape == (64, 64) and batched.max() > 0
    torch.testing.assert_close(batched, single)  # images do not interact in eval mode
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="batch_size=0"):
        erf_map(model, x, batch_size=0)


def test_visualize_erf_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt = save_weights(create_model("test_convnextv2", num_classes=0), tmp_path / "w.safetensors")
    out = tmp_path / "erf.png"
    assert main(["visualize", "erf", "--model", "test_convnextv2", "--model", "test_convnext", "--checkpoint",
                 str(ckpt), "--checkpoint", "none", "--images", "synthetic", "--out", str(out), "--size", "64",
                 "--num-images", "2"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res) == ["test_convnextv2 (w.safetensors)", "test_convnext (random init)"]
    for r in res.values():
        assert r["images"] == 2 and [x["t"] for x in r["ratios"]] == [0.2, 0.3, 0.5, 0.99]
        assert all(0 < x["area_ratio"] <= 1 for x in r["ratios"])
    assert out.is_file() and out.stat().st_size > 0
    assert "test_convnext (random init): t=0.2: side" in capsys.readouterr().out
    # one checkpoint for two models is ambiguous: a clear error, no traceback
    assert main(["visualize", "erf", "--model", "test_convnext", "--model", "test_convnextv2", "--checkpoint",
                 str(ckpt), "--images", "synthetic", "--out", str(out)]) == 2
    assert "one --checkpoint per --model" in capsys.readouterr().err


@pytest.mark.parametrize("name", list_models("test_*"))  # any registered family, through forward_intermediates
def test_erf_of_every_family(name):
    model = create_model(name, num_classes=0)
    size = 2 * getattr(model, "stride", 32)
    erf = erf_map(model, torch.randn(1, 3, size, size))
    assert erf.shape == (size, size) and torch.isfinite(erf).all() and erf.max() > 0
    assert len(high_contribution_area(erf)) == 4
