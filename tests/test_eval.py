"""`eval`: numbers you can trust (non-finite weights/outputs, zero images, dropped files named), raw vs EMA
weights, any weights file or run folder, per-class table with names, one output folder per split/data."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from maskconv.cli import main

TINY = ["--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short finetune run on synthetic data (4 classes, a val split) that keeps EMA weights."""
    out = tmp_path_factory.mktemp("eval") / "ft"
    assert main(["finetune", *TINY, "--out", str(out), "optim.epochs=1", "optim.blr=1e-2",
                 "optim.ema_decay=0.5"]) == 0
    return out


def _folder(root, files_per_class=3, broken=()):
    """Labeled folder with class0 / class1 sub-folders of 64 px PNGs (+ broken files, as named)."""
    rng = np.random.default_rng(0)
    for c in ("class0", "class1"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(files_per_class):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    for name in broken:
        (root / name).write_bytes(b"\x89PNG broken")
    return root


def test_eval_prints_raw_and_ema_with_class_names(run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert "raw weights: top-1" in out and "EMA weights: top-1" in out
    assert "top-5" not in out  # 4 classes: top-5 would always be 100%
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("class")]
    assert [r[0] for r in rows[1:]] == ["class0", "class1", "class2", "class3"] and all(r[1] == "8" for r in rows[1:])
    res = json.loads((run / "eval" / "val" / "eval.json").read_text())
    assert res["classes"] == ["class0", "class1", "class2", "class3"] and "val_top5" not in res["raw"]
    assert (run / "eval" / "val" / "confusion_raw.png").is_file() and (run / "eval" / "val" / "confusion_ema.png").is_file()
    # raw and EMA are different weights (decay 0.5 after 8 steps): the scores come from each, not one twice
    ck = torch.load(run / "last.pt", weights_only=True)
    assert not torch.equal(ck["model"]["head.fc.weight"], ck["ema"]["module.head.fc.weight"])
    assert main(["eval", "--checkpoint", str(run), "--weights", "ema", "--out", str(run / "only_ema")]) == 0
    assert "raw weights" not in capsys.readouterr().out
    only = json.loads((run / "only_ema" / "eval.json").read_text())
    assert set(only["weights"]) == {"ema"} and only["ema"]["val_top1"] == res["ema"]["val_top1"]


def test_eval_reads_weights_files(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--checkpoint", str(run), "--weights", "raw", "--out", str(tmp_path / "b")]) == 0
    from_file, from_run = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert set(from_file["weights"]) == {"raw"} and from_file["weights"]["raw"].endswith("model.safetensors")
    assert from_file["raw"]["val_confusion"] == from_run["raw"]["val_confusion"]  # same weights, same numbers
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "model_ema.safetensors", alone / "model_ema.safetensors")
    data = _folder(tmp_path / "data")
    # no config.json beside it: the architecture is in the file's metadata, but the data must be named
    assert main(["eval", "--checkpoint", str(alone / "model_ema.safetensors")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(alone / "model_ema.safetensors"), "--data", str(data),
                 "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "EMA weights: top-1" in out and "6 images, 4 classes" in out
    (folder,) = (alone / "eval").iterdir()  # eval/<data name>-<hash>-all
    assert folder.name.startswith("data-") and folder.name.endswith("-all")
    assert json.loads((folder / "eval.json").read_text())["images"] == 6


def test_eval_output_folder_per_split_and_data(run, tmp_path):
    a, b = _folder(tmp_path / "x" / "data"), _folder(tmp_path / "y" / "data", files_per_class=2)
    assert main(["eval", "--checkpoint", str(run), "--data", str(a)]) == 0
    assert main(["eval", "--checkpoint", str(run), "--data", str(b)]) == 0
    assert main(["eval", "--checkpoint", str(run)]) == 0
    found = {p.parent.name: json.loads(p.read_text())["images"] for p in (run / "eval").glob("*/eval.json")}
    assert found.pop("val") == 32 and sorted(found.values()) == [4, 6]  # same folder name, two data sets kept apart


def test_eval_refuses_non_finite_weights(run, tmp_path, capsys):
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in ("config.json", "classes.json"):
        shutil.copy(run / f, bad / f)
    sd = load_file(run / "model.safetensors")
    sd["stages.1.blocks.0.conv_dw.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "stages.1.blocks.0.conv_dw.weight" in err
    assert not (bad / "eval").exists()


def test_eval_refuses_non_finite_outputs():
    from torch.utils.data import DataLoader

    from maskconv.data.datasets import SeededDataset, SyntheticImages, collate_skip
    from maskconv.train import evaluate_classifier

    class Overflow(torch.nn.Module):  # finite weights, infinite logits
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1e38))

        def forward(self, x):
            return (x.flatten(1)[:, :4] + 10) * self.w * 10

    loader = DataLoader(SeededDataset(SyntheticImages(8, size=8), lambda t: t.float()), batch_size=4,
                        collate_fn=collate_skip)
    with pytest.raises(ValueError, match="non-finite outputs"):
        evaluate_classifier(Overflow(), loader, 4, progress=False)


def test_eval_zero_readable_images_is_an_error(run, tmp_path, capsys):
    data = tmp_path / "broken"
    for c in ("class0", "class1"):
        (data / c).mkdir(parents=True)
        (data / c / "x.png").write_bytes(b"\x89PNG not an image")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no readable image" in err and "class0/x.png (not a decodable image)" in err
    assert not (tmp_path / "o").exists()


def test_eval_counts_and_names_dropped_files(run, tmp_path, capsys):
    data = _folder(tmp_path / "d", broken=("class0/zz_broken.png", "class1/zz_cut.png"))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) skipped:" in out and "zz_broken.png" in out and "zz_cut.png" in out
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert res["images"] == 6 and res["unreadable"]["count"] == 2
    assert sorted(p.rsplit("/", 1)[1] for p in res["unreadable"]["first"]) == ["zz_broken.png", "zz_cut.png"]


def test_eval_of_a_folder_without_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "resume" not in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such run folder or weights file" in capsys.readouterr().err


def test_eval_of_last_pt_and_linprobe_weights_and_missing_ema(run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "pt")]) == 0
    assert main(["eval", "--checkpoint", str(run / "model_ema.safetensors"), "--weights", "raw"]) == 2
    assert "holds only ema weights" in capsys.readouterr().err
    lp = tmp_path / "lp"
    assert main(["linprobe", *TINY, "--out", str(lp), "optim.epochs=1", "run.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(lp), "--weights", "ema"]) == 2
    assert "the run kept no EMA" in capsys.readouterr().err
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "probe.safetensors").write_bytes((lp / "model.safetensors").read_bytes())
    # a bare linear-probe weights file: BN + Linear head recognised from its keys, scored like its run
    assert main(["eval", "--checkpoint", str(lp), "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--checkpoint", str(alone / "probe.safetensors"), "--data", "synthetic", "--img-size", "64",
                 "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert b["task"] == "linprobe" and a["raw"]["val_confusion"] == b["raw"]["val_confusion"]
    assert "no EMA weights in this run" in capsys.readouterr().out


def test_fifo_in_eval_data_is_skipped_and_named(run, tmp_path, capsys):
    import os

    data = _folder(tmp_path / "d")
    os.mkfifo(data / "class1" / "0_pipe.png")  # reading it would block forever
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert res["images"] == 6 and list(res["unreadable"]["first"].values()) == ["FIFO"]
    assert "0_pipe.png (FIFO)" in capsys.readouterr().out


def test_a_class_with_no_image_has_no_accuracy_not_zero():
    # per-class accuracy of a class absent from the evaluated split is n/a (None), not 0.00%
    import torch

    from maskconv.tasks.classify import evaluate_classifiers

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    class Loader(list):  # batches of (images, labels, unreadable) as the eval loader gives them
        dataset = None

    batches = Loader([(torch.randn(4, 3, 4, 4), torch.tensor([0, 0, 2, 2]), {})])
    res = evaluate_classifiers({"": model}, batches, 3, device="cpu", progress=False)[""]
    pc = res["val_per_class"]
    assert pc[1] is None and pc[0] is not None and pc[2] is not None
    assert sum(map(sum, res["val_confusion"])) == 4
