"""Pictures read images as training does, at the training size, and lay out what they show: 16-bit PNGs,
run folders, `--checkpoint none`, collapse y-range, ERF centring, no clipped titles, V1 visible under V2."""
import numpy as np
import pytest
import torch

from maskconv import api
from maskconv.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture
def captured_figures(monkeypatch):
    """Figures as they are saved (drawn, before closing), for layout checks."""
    from maskconv.viz import _plot

    figs, real_save = [], _plot.save

    def save(fig, path, dpi=100, top=1.0):
        out = real_save(fig, path, dpi, top)  # tight layout, write (and close)
        figs.append(fig)
        return out

    for mod in ("collapse", "erf", "models", "reconstruction"):
        monkeypatch.setattr(f"maskconv.viz.{mod}.save", save)
    return figs


def _texts_inside(fig) -> list[str]:
    """Titles, axis labels and annotations that reach outside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure as saved (closing detached its canvas)
    canvas.draw()
    r = canvas.get_renderer()
    box = fig.bbox
    bad = []
    texts = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts)]
    for t in texts:
        if t is None or not t.get_text() or not t.get_visible():
            continue
        e = t.get_window_extent(r)
        if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1:
            bad.append(t.get_text())
    return bad


def test_recon_reads_16_bit_png_with_the_training_decoder_at_the_run_size(tmp_path, monkeypatch):
    from PIL import Image

    run = tmp_path / "pre"
    assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(run),
                 "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "run.max_steps=1",
                 "run.progress=false", "objective.decoder_dim=16"]) == 0
    a = np.full((80, 90), 30000, dtype=np.uint16)  # mid-grey in 16 bits: 30000 / 65535 = 0.46
    a[:, 45:] = 12000
    png = tmp_path / "deep.png"
    Image.fromarray(a).save(png)
    with Image.open(png) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    x = api.sample_images(str(png), 64, 3, 1)  # (1, 3, 64, 64), ImageNet-normalised
    from maskconv.data import default_norm

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in default_norm(3))
    pix = (x * std + mean).clamp(0, 1)
    assert pix.max() < 0.6 and abs(pix[..., :, :20].mean().item() - 30000 / 65535) < 0.02  # not white
    seen = {}
    from maskconv.tasks import visualize

    real = visualize.sample_images
    monkeypatch.setattr(visualize, "sample_images", lambda src, size, c, n: seen.setdefault("size", size) and real(
        src, size, c, n))
    out = tmp_path / "recon.png"
    assert main(["visualize", "recon", "--checkpoint", str(run), "--images", str(png), "--out", str(out)]) == 0
    assert seen["size"] == 64 and out.is_file()  # the run's data.img_size, from a run folder


def test_collapse_checkpoint_none_and_y_range_above_half(tmp_path, captured_figures):
    from maskconv.viz.collapse import plot_collapse

    out = tmp_path / "c.png"
    assert main(["visualize", "collapse", "--checkpoint", "none", "--model", "test_convnextv2",
                 "--images", "synthetic", "--out", str(out), "--size", "64", "--limit", "4"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    rows = [dict(layer=i, distance=d) for i, d in enumerate([0.45, 0.55, 0.62])]
    plot_collapse({"m": rows}, tmp_path / "p.png")
    lo, hi = captured_figures[-1].axes[0].get_ylim()
    assert lo == 0 and hi > 0.62 * 1.05  # the highest point is inside the frame, not on it


def test_erf_map_is_centred_at_even_output_sizes():
    from maskconv import create_model
    from maskconv.viz.erf import central, erf_map

    torch.manual_seed(0)
    model = create_model("test_convnextv2", num_classes=0)  # stride 32: 64 px -> a 2x2 output (even)
    m = erf_map(model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cy, cx = (m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()
    assert abs(cy - 31.5) < 3 and abs(cx - 31.5) < 3, (cy, cx)  # the official [h//2, w//2] pixel: ~16 px off
    f = torch.randn(2, 5, 3, 4)
    assert torch.equal(central(f)[:, :], f[:, :, 1, 1:3].mean(-1))  # odd side: that pixel; even: both middles


def test_erf_and_zoo_titles_fit_and_v1_stays_visible(tmp_path, captured_figures):
    from maskconv.viz.erf import plot_erf
    from maskconv.viz.models import plot_model_table

    m = torch.rand(32, 32)
    plot_erf({"convnextv2_tiny (random init)": m}, tmp_path / "e.png",
             title="effective receptive field, random-init weights (8 images from photos, 256px; % = area holding t "
                   "of the log-ERF)")
    assert _texts_inside(captured_figures[-1]) == []
    rows = [api.ModelRow("convnext_atto", 3.7, 0.55, 300.0), api.ModelRow("convnextv2_atto", 3.71, 0.55, 250.0)]
    plot_model_table(rows, tmp_path / "z.png", 224, api.machine_description())
    fig = captured_figures[-1]
    assert _texts_inside(fig) == []
    assert "measured once" in fig.axes[1].get_title() and "load" in fig.axes[1].get_title()
    v1, v2 = fig.axes[0].collections[:2]  # same point: V1 must be larger and see-through, V2 inside it
    assert v1.get_sizes()[0] > 2 * v2.get_sizes()[0] and v1.get_facecolor().size == 0
