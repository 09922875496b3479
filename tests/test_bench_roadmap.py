"""bench/roadmap.py's verdicts: the sentence BENCHMARKS.md quotes for each roadmap step must follow from the seeds."""
import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "roadmap.py"
    spec = importlib.util.spec_from_file_location("bench_roadmap", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_verdicts(bench):
    acc = {0: [70.0, 71.0, 72.0], 1: [74.0, 75.0, 76.0], 2: [70.5, 71.5, 72.5], 3: [80.0], 4: [71.2, 72.2, 73.2]}
    up = bench._compare(acc, 1, 0, +0.6, "x")
    assert up["ours_delta"] == 4.0 and up["se"] == pytest.approx(0.82, abs=0.005)  # sqrt(1/3 + 1/3)
    assert up["verdict"] == "agrees"
    assert bench._compare(acc, 1, 0, -1.2, "x")["verdict"] == "disagrees"
    assert bench._compare(acc, 1, 0, 0.0, "x")["verdict"] == "disagrees"  # the paper saw no change, we see one
    assert bench._compare(acc, 2, 0, +0.6, "x")["verdict"] == "within noise"  # 0.5 < 2 x 0.82
    assert bench._compare(acc, 4, 0, +0.6, "x")["verdict"] == "within noise"  # 1.2: beyond 1 s.e., not 2
    assert bench._compare(acc, 3, 0, +0.6, "x")["verdict"] == "one seed"
    assert bench._compare(acc, 1, 0, None, "x")["verdict"] == "n/a"


def test_directions_follow_parents_and_end_with_the_whole_road(bench):
    steps = range(len(bench.ROADMAP))
    acc = {i: [70.0 + i, 71.0 + i] for i in steps}
    dirs = bench._directions(acc)
    assert [(d["parent"], d["step"]) for d in dirs[:-1]] == [(s.parent, i) for i, s in enumerate(bench.ROADMAP)
                                                            if s.parent is not None]
    last = len(bench.ROADMAP) - 1
    road = dirs[-1]
    assert (road["parent"], road["step"], road["ours_delta"]) == (0, last, float(last))
    assert road["paper_delta"] == round(bench.ROADMAP[last].top1 - bench.ROADMAP[0].top1, 1) > 0
    kernel5 = next(d for d in dirs if d["step"] == 7)  # the paper's chart-only step: no figure to agree with
    assert kernel5["paper_delta"] is None and kernel5["verdict"] == "n/a"
