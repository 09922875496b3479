import json

import pytest
import torch

from maskconv.config import load_config
from maskconv.data.coco import load_coco
from maskconv.data.datasets import find_fashion_mnist
from maskconv.pix2seq.task import (Pix2SeqOptions, evaluate_detection, load_pix2seq, run_pix2seq_eval,
                                   run_pix2seq_predict, run_pix2seq_train)
from tests.data.test_coco import write_coco

needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist not installed")
    from maskconv.data.scenes import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    return make_scenes(root / "train", "train", 8, 0, size=64, max_items=3).parent, \
        make_scenes(root / "val", "val", 30, 0).parent


def test_oracle_through_tokenizer_scores_ap50_on_scenes(scenes):
    res, dets = evaluate_detection(None, load_coco(scenes[1]), Pix2SeqOptions(), 128, oracle=True)
    assert res["AP50"] >= 0.99 and res["AP"] > 0.9
    res_coarse, _ = evaluate_detection(None, load_coco(scenes[1]), Pix2SeqOptions(bins=16), 128, oracle=True)
    assert res_coarse["AP"] < res["AP"] - 0.1  # the check sees quantization


def test_oracle_scores_ap_one_on_an_id0_file(tmp_path):
    data = load_coco(write_coco(tmp_path / "c", size=(60, 45)))
    res, _ = evaluate_detection(None, data, Pix2SeqOptions(bins=1000), 64, oracle=True)
    assert res["AP"] == pytest.approx(1.0)


def _cfg(data, out, **kw):
    o = {"model.name": "test_convnextv2", "data.path": str(data), "data.img_size": 64, "data.batch_size": 4,
         "data.num_workers": 0, "optim.epochs": 2, "optim.warmup_epochs": 0, "optim.lr": 1e-3, "run.out": str(out),
         "run.device": "cpu", "run.progress": False, "run.log_every_steps": 1, "run.seed": 3}
    o.update(kw)
    return load_config(overrides=o)


TINY = Pix2SeqOptions(max_objects=4, dim=32, depth=1, heads=4, jitter_min=0.8, jitter_max=1.2)


@needs_fmnist
def test_train_resume_equals_uninterrupted_and_eval_predict(scenes, tmp_path, monkeypatch):
    train = scenes[0]
    full = run_pix2seq_train(_cfg(train, tmp_path / "a"), TINY)
    calls = {"n": 0}
    real_ce = torch.nn.functional.cross_entropy

    def crash_on_fourth(*a, **k):  # a crash in step 4, after step 3's checkpoint
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_ce(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_pix2seq_train(_cfg(train, tmp_path / "b", **{"run.save_every_steps": 1}), TINY)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["state"]["step"] == 3
    run_pix2seq_train(_cfg(train, tmp_path / "b", **{"run.save_every_steps": 1}), TINY)  # resumed
    la = [json.loads(x)["loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert la == lb and len(la) == 4
    ma, _, _ = load_pix2seq(tmp_path / "a")
    mb, _, _ = load_pix2seq(tmp_path / "b")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert full.state.step == 4
    with pytest.raises(ValueError, match="other settings"):
        run_pix2seq_train(_cfg(train, tmp_path / "a"), Pix2SeqOptions(max_objects=5, dim=32, depth=1, heads=4))
    res = run_pix2seq_eval(tmp_path / "a", train, batch_size=8)
    assert set(res) >= {"AP", "AP50", "AP75"}
    preds = json.loads((tmp_path / "a/eval/predictions.json").read_text())
    assert all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in preds)
    rows = run_pix2seq_predict(tmp_path / "a", train / "images", tmp_path / "p.json", tmp_path / "p.png", threshold=0)
    assert (tmp_path / "p.png").is_file() and json.loads((tmp_path / "p.json").read_text()) == rows
    assert all({"file_name", "category", "category_id", "bbox", "score"} == set(r) for r in rows)


@needs_fmnist
def test_cli_train_eval_predict(scenes, tmp_path):
    from maskconv.cli import main

    train = str(scenes[0])
    args = ["pix2seq", "train", "--backbone", "test_convnextv2", "--data", train, "--val", train, "--out", str(tmp_path / "r"),
            "--max-objects", "4", "--dim", "32", "--depth", "1", "--heads", "4", "data.img_size=64",
            "data.batch_size=4", "data.num_workers=0", "optim.epochs=1", "run.progress=false", "run.device=cpu"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert "val_AP50" in rows[-1] and 0 <= rows[-1]["val_AP50"] <= 1
    assert main(["pix2seq", "eval", "--checkpoint", str(tmp_path / "r"), "--data", train]) == 0
    assert main(["pix2seq", "predict", "--checkpoint", str(tmp_path / "r"), "--images", train + "/images",
                 "--out", str(tmp_path / "p.json"), "--draw", str(tmp_path / "p.png")]) == 0
    assert main(["pix2seq", "eval", "--checkpoint", str(tmp_path / "nothing"), "--data", train]) == 2


@needs_fmnist
@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(scenes, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "maskconv", "pix2seq", "train", "--backbone", "test_convnextv2", "--data", str(scenes[0]),
            "--max-objects", "4", "--dim", "32", "--depth", "1", "--heads", "4", "data.img_size=64",
            "data.batch_size=4", "data.num_workers=0", "optim.epochs=12", "run.progress=false", "run.device=cpu",
            "run.save_every_steps=1", "run.log_every_steps=1"]
    ref = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "ref")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill mid-run, after a few steps (possibly mid-checkpoint)
        m = run / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    again = subprocess.run([sys.executable, *args, "--out", str(run)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_fmnist
@pytest.mark.slow
def test_tiny_model_overfits_scenes(tmp_path):
    """The whole pipeline learns: 32 scenes (1-3 items, 64 px), AP50 >= 0.9 on those scenes after training."""
    from maskconv.data.scenes import make_scenes

    js = make_scenes(tmp_path / "s", "train", 32, 0, size=64, max_items=3)
    o = Pix2SeqOptions(max_objects=4, dim=64, depth=2, heads=4, drop=0.0, drop_path=0.0, jitter_min=1.0, jitter_max=1.0)
    cfg = _cfg(js.parent, tmp_path / "r", **{"model.stem_stride": 2, "data.batch_size": 8, "optim.epochs": 400,
                                             "optim.warmup_epochs": 1, "optim.lr": 2e-3, "optim.weight_decay": 0.0,
                                             "run.log_every_steps": 100, "run.save_every_epochs": 1000})
    res = run_pix2seq_train(cfg, o)
    r, _ = evaluate_detection(res.model, load_coco(js), o, 64)
    assert r["AP50"] >= 0.9, r


@pytest.mark.parametrize("kw, need", [({"dim": 30, "heads": 4}, "multiple of pix2seq.heads"), ({"top_p": 0}, "top_p"),
                                      ({"corruption": "typo"}, "corruption"), ({"max_objects": 0}, "max_objects")])
def test_bad_options_fail_with_one_line(kw, need, tmp_path, capsys):
    with pytest.raises(ValueError, match=need):
        Pix2SeqOptions(**kw)
    from maskconv.cli import main

    flag = "--" + next(iter(kw)).replace("_", "-")
    assert main(["pix2seq", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), flag,
                 str(next(iter(kw.values())))]) == 2
    assert f"pix2seq.{next(iter(kw))}" in capsys.readouterr().err
