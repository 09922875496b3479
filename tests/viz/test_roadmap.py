"""`maskconv roadmap`: the table (measured params / GMACs beside the paper's figures) and the Figure-2 chart."""
import pytest

from maskconv.cli import main
from maskconv.models.roadmap import ROADMAP
from maskconv.viz.roadmap import format_roadmap, plot_roadmap, roadmap_table


@pytest.fixture(scope="module")
def rows():
    return roadmap_table(224)


def test_table_rows_measure_every_step(rows):
    assert [r.index for r in rows] == list(range(len(ROADMAP)))
    assert round(rows[0].params_m, 2) == 25.56 and round(rows[-1].params_m, 2) == 28.59  # torchvision / timm counts
    assert round(rows[0].gmacs, 2) == 4.09 and round(rows[-1].gmacs, 2) == 4.46
    text = format_roadmap(rows)
    k5 = next(line for line in text.splitlines() if "roadmap_07_kernel5" in line)
    assert k5.split()[-3:] == ["4.1", "Fig.", "2"]  # paper GFLOPs given, top-1 left blank (not transcribed)
    r50 = next(line for line in text.splitlines() if "roadmap_00_resnet50" in line)
    assert "4.089" in r50 and "78.8" in r50


def test_cli_prints_the_table_and_writes_the_chart(tmp_path, capsys):
    out = tmp_path / "fig" / "roadmap.png"
    assert main(["roadmap", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"roadmap_{i:02d}_" in printed for i in range(len(ROADMAP)))
    assert "82.0" in printed and f"wrote {out}" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_with_measured_accuracies(tmp_path, rows):
    path = plot_roadmap(rows[:3], tmp_path / "m.png", {0: [80.0, 81.0], 1: [82.5], 2: [79.0, 79.5, 80.0]})
    assert path.stat().st_size > 10_000
