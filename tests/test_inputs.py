"""Input checks before any work or file (``maskconv.inputs.check_inputs``): a refused command writes nothing."""
import numpy as np
import pytest
from PIL import Image

from maskconv.cli import main
from maskconv.config import load_config
from maskconv.inputs import check_inputs

COMMON = ["--model", "test_convnextv2", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
          "run.progress=false", "optim.epochs=1", "run.max_steps=1"]


def _images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _refused(tmp_path, capsys, *args):
    out = tmp_path / "run"
    assert main([args[0], *COMMON, *args[1:], "--out", str(out)]) == 2  # later values win
    err = capsys.readouterr().err
    assert not out.exists(), "a refused command must write nothing"
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def test_one_class_layout_is_refused_writing_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    _images(data, 4)  # loose images ...
    _images(data / "cats", 4)  # ... and one class folder
    err = _refused(tmp_path, capsys, "finetune", "--data", str(data))
    assert "needs at least 2 classes" in err and "1 class folder(s) (cats)" in err


def test_data_must_be_named(tmp_path, capsys):
    err = _refused(tmp_path, capsys, "pretrain")
    assert "pretrain needs data: pass --data" in err
    assert main(["finetune", *COMMON, "--data", "synthetic", "--out", str(tmp_path / "ok")]) == 0  # by name


def test_image_size_not_a_multiple_of_the_stride_fails_before_the_run_folder(tmp_path, capsys):
    err = _refused(tmp_path, capsys, "finetune", "--data", "synthetic", "data.img_size=60")
    assert "data.img_size=60 does not suit test_convnextv2" in err and "stride 32" in err
    err = _refused(tmp_path, capsys, "pretrain", "--data", "synthetic", "data.img_size=60")
    assert "data.img_size=60 is not a multiple of the patch size 32" in err
    err = _refused(tmp_path, capsys, "pretrain", "--data", "synthetic", "data.img_size=32")  # a 1x1 patch grid
    assert "leaves no patch visible" in err and "1x1 grid" in err


def test_folder_of_only_broken_files_is_one_line(tmp_path, capsys):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(b"\x89PNG not an image")
    err = _refused(tmp_path, capsys, "pretrain", "--data", str(data), "data.num_workers=2")
    assert "none of the 4 image files of the training data can be read" in err and "not a decodable image" in err


def test_layout_notes_no_validation_and_loose_files(tmp_path):
    data = tmp_path / "data"
    _images(data / "a", 4)
    _images(data / "b", 4, start=4)
    _images(data, 2, start=8)  # loose files beside the class folders
    cfg = load_config(overrides={"task": "finetune", "model.name": "test_convnextv2", "data.path": str(data),
                                 "data.img_size": 64})
    inputs = check_inputs(cfg)
    assert inputs.classes == ["a", "b"] and inputs.val is None and len(inputs.train) == 8
    assert any("2 image file(s) directly in" in n and "008.png" in n for n in inputs.notes)
    assert any("no train/ and val/ sub-folders" in n and "no validation" in n for n in inputs.notes)
    for split in ("train", "val"):
        _images(tmp_path / "split" / split / "a", 2)
        _images(tmp_path / "split" / split / "b", 2, start=2)
    cfg.data.path = str(tmp_path / "split")
    inputs = check_inputs(cfg)
    assert len(inputs.val) == 4 and not inputs.notes


def test_worker_error_is_one_line(tmp_path, capsys):
    # readable at the start, then a long run of broken files: the error is raised inside a DataLoader worker
    data = tmp_path / "data"
    _images(data, 1)
    for i in range(1, 40):
        (data / f"{i:03d}.png").write_bytes(b"broken")
    out = tmp_path / "run"
    assert main(["pretrain", *COMMON, "--data", str(data), "data.num_workers=1", "--out", str(out),
                 "run.max_steps=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "consecutive files" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("task", ["linprobe"])
def test_named_unlabeled_data_refused_for_labeled_tasks(tmp_path, capsys, task):
    err = _refused(tmp_path, capsys, task, "--data", "photos")
    assert "no labels" in err


def test_fifo_in_training_data_is_skipped_and_reported(tmp_path, capsys):
    import os
    import time

    data = tmp_path / "data"
    _images(data, 8)
    os.mkfifo(data / "000_pipe.png")  # sorted first: reading it would hang the run forever
    t0 = time.time()
    assert main(["pretrain", *COMMON, "--data", str(data), "--out", str(tmp_path / "r"), "data.num_workers=1"]) == 0
    assert time.time() - t0 < 120
    assert "note: training data: 1 file(s) skipped:" in capsys.readouterr().out


def test_finetune_into_a_pretrain_run_folder_is_refused_writing_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *COMMON, "--data", "synthetic", "--out", str(out), "objective.decoder_dim=16"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["finetune", *COMMON, "--data", "synthetic", "--out", str(out)]) == 2
    assert "holds a pretrain run of test_convnextv2; this is a finetune run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no classes.json, config.json untouched


def test_val_fraction_holds_out_the_same_images_for_training_and_eval(tmp_path, capsys):
    import json

    data = tmp_path / "data"
    _images(data / "a", 10)
    _images(data / "b", 10, start=10)
    import os

    os.mkfifo(data / "b" / "pipe.png")
    cfg = load_config(overrides={"task": "finetune", "model.name": "test_convnextv2", "data.path": str(data),
                                 "data.img_size": 64, "data.val_fraction": 0.2})
    inputs = check_inputs(cfg)
    tr, va = inputs.train, inputs.val
    assert len(tr) == 16 and len(va) == 4 and not set(tr.indices) & set(va.indices)
    assert sorted(va.labels) == [0, 0, 1, 1] and any("4 images (0.2 of each class) held out" in n for n in inputs.notes)
    assert check_inputs(cfg).val.indices == va.indices  # a function of the file list only
    assert [n for n in inputs.notes if "skipped" in n] == [f"training data: 1 file(s) skipped: {data}/b/pipe.png (FIFO)"]
    out = tmp_path / "run"
    assert main(["finetune", *COMMON, "--data", str(data), "data.val_fraction=0.2", "run.max_steps=0", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_top1" in rows[-1]
    assert main(["eval", "--checkpoint", str(out)]) == 0  # the run's own held-out images, not its training ones
    res = json.loads((out / "eval" / "val" / "eval.json").read_text())
    assert res["images"] == 4 and res["unreadable"]["count"] == 1  # the FIFO, named in eval too


def test_keep_best_on_a_validation_metric_without_validation_data_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    _images(data / "a", 4)
    _images(data / "b", 4, start=4)
    err = _refused(tmp_path, capsys, "finetune", "--data", str(data), "run.keep_best=val_top1")
    assert "run.keep_best='val_top1': this run has no evaluation" in err
