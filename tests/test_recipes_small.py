"""Small-data recipes: an absolute lr that learns at batch 16-64 whatever the batch, used by `make demo`."""
import json

import pytest

from maskconv.cli import main
from maskconv.config import load_config

SMALL = {"small_pretrain": ("pretrain", 2e-3), "small_finetune": ("finetune", 1e-3), "small_linprobe": ("linprobe", 1e-2)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_recipes_set_an_absolute_lr_for_their_task(name):
    task, lr = SMALL[name]
    for batch in (16, 64):
        cfg = load_config(name, [f"data.batch_size={batch}"])
        assert cfg.task == task and cfg.optim.lr == lr  # not blr x batch / 256 (~1e-5 at batch 16)
    # one stem and crop size for the three, so an encoder from small_pretrain loads into the other two
    assert (cfg.model.name, cfg.model.stem_stride, cfg.data.img_size) == ("convnextv2_atto", 2, 64)


def test_small_finetune_runs_with_its_resolved_lr(tmp_path):
    run = tmp_path / "ft"
    assert main(["finetune", "--recipe", "small_finetune", "--model", "test_convnextv2", "--data", "synthetic",
                 "--out", str(run), "data.batch_size=16", "data.num_workers=0", "run.max_steps=2",
                 "run.progress=false"]) == 0
    assert json.loads((run / "config.json").read_text())["resolved"]["lr"] == 1e-3


def test_demo_pretrains_with_the_small_pretrain_recipe(tmp_path):
    pytest.importorskip("skimage")
    from maskconv.api import run_pretrain_demo

    paths = run_pretrain_demo(tmp_path, data="photos", overrides=[
        "model.name=test_convnextv2", "data.img_size=64", "data.batch_size=4", "run.max_steps=2",
        "objective.decoder_dim=16", "run.progress=false"])
    saved = json.loads((paths["pretraining run"] / "config.json").read_text())
    assert saved["resolved"]["lr"] == 2e-3 and saved["model"]["stem_stride"] == 2
