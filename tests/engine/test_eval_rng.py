"""Validation must not change training: how often a run validates leaves its trained weights bit-identical
(evaluation draws from the global RNG: a DataLoader's base seed, Pix2Seq's top-p sampling)."""
import torch
from safetensors.torch import load_file

from maskconv.cli import main

TINY = ["--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false", "model.drop_path_rate=0.3", "optim.epochs=2", "optim.blr=1e-3"]


def test_validation_cadence_leaves_training_unchanged(tmp_path):
    every, last = tmp_path / "every", tmp_path / "last"
    assert main(["finetune", *TINY, "--out", str(every), "run.eval_every_epochs=1"]) == 0
    assert main(["finetune", *TINY, "--out", str(last), "run.eval_every_epochs=2"]) == 0
    rows = (every / "metrics.jsonl").read_text().count("val_top1"), (last / "metrics.jsonl").read_text().count("val_top1")
    assert rows == (2, 1)  # the two runs did validate differently
    a, b = load_file(every / "model.safetensors"), load_file(last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
