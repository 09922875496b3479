"""Pix2Seq recipes: the pix2seq.* section of the config (recipe < flags / key=value), the packaged recipes."""
import json
from pathlib import Path

import pytest
import yaml

import maskconv
from maskconv.cli import _build_parser, main
from maskconv.commands import config_from_args
from maskconv.config import ConfigError, flatten, load_config

RECIPES = Path(maskconv.__file__).parent / "recipes"

# Read off google-research/pix2seq (commit eabd4e9) by hand, independently of the YAML: configs/config_det_finetune.py
# (image_size, quantization_bins, max_instances_per_image, noise_bbox_weight, eos_token_weight,
# class_label_corruption, top_p, temperature, drop_path, drop_units, optimization.*, train.batch_size/epochs),
# configs/config_base.py vit-b (decoder layers, dim_att_dec, dim_mlp_dec / dim, num_heads_dec),
# configs/transform_configs.py (scale_jitter min/max, random_horizontal_flip).
OFFICIAL_DET_FINETUNE = {
    "task": "pix2seq", "model.name": "vit_base_patch16_224", "model.drop_path_rate": 0.1,
    "data.img_size": 640, "data.batch_size": 32,
    "optim.epochs": 40, "optim.warmup_epochs": 2, "optim.lr": 3e-5, "optim.min_lr": 3e-5 * 0.01,
    "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.95], "optim.clip_grad": None,
    "pix2seq.bins": 1000, "pix2seq.max_objects": 100, "pix2seq.dim": 512, "pix2seq.depth": 6, "pix2seq.heads": 16,
    "pix2seq.mlp_ratio": 2048 / 512, "pix2seq.drop": 0.1, "pix2seq.drop_path": 0.1, "pix2seq.jitter_min": 0.3,
    "pix2seq.jitter_max": 2.0, "pix2seq.hflip": True, "pix2seq.noise": True, "pix2seq.corruption": "rand_n_fake_cls",
    "pix2seq.noise_bbox_weight": 1.0, "pix2seq.eos_token_weight": 0.1, "pix2seq.top_p": 0.4,
    "pix2seq.temperature": 1.0,
}


def test_coco_official_recipe_is_the_transcription():
    text = (RECIPES / "pix2seq_coco_official.yaml").read_text()
    assert "configs/config_det_finetune.py" in text  # the header cites the file it transcribes
    got = flatten(yaml.safe_load(text))
    assert set(got) == set(OFFICIAL_DET_FINETUNE)  # no key added or left out
    for k, v in OFFICIAL_DET_FINETUNE.items():
        assert got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v, k
    cfg = load_config("pix2seq_coco_official")
    assert (cfg.pix2seq.bins, cfg.pix2seq.top_p, cfg.optim.betas, cfg.data.img_size) == (1000, 0.4, (0.9, 0.95), 640)


def test_scenes_recipe_says_what_it_was_sized_for():
    text = (RECIPES / "pix2seq_scenes.yaml").read_text()
    assert "Sized for" in text
    cfg = load_config("pix2seq_scenes")
    assert (cfg.task, cfg.model.name, cfg.data.img_size, cfg.pix2seq.bins) == ("pix2seq", "convnextv2_atto", 128, 256)


def _args(*argv):
    return config_from_args(_build_parser().parse_args(["pix2seq", "train", "--data", "d", "--out", "o", *argv]))


def test_precedence_defaults_recipe_flags():
    assert _args().pix2seq.max_objects == 100  # default
    cfg = _args("--recipe", "pix2seq_scenes")
    assert (cfg.pix2seq.max_objects, cfg.pix2seq.depth, cfg.pix2seq.noise) == (10, 4, True)  # recipe, else default
    cfg = _args("--recipe", "pix2seq_scenes", "--max-objects", "3", "--pix2seq.depth", "2", "pix2seq.noise=false")
    assert (cfg.pix2seq.max_objects, cfg.pix2seq.depth, cfg.pix2seq.noise, cfg.pix2seq.bins) == (3, 2, False, 256)
    assert cfg.task == "pix2seq"
    with pytest.raises(ConfigError, match="pix2seq.bins is given twice"):
        _args("--bins", "64", "pix2seq.bins=32")


@pytest.mark.parametrize("section, err", [("{binz: 3}", "unknown config key 'pix2seq.binz'"),
                                          ("{bins: many}", "pix2seq.bins: expected an integer"),
                                          ("{top_p: 1.5}", r"pix2seq.top_p=1.5: must be in \(0, 1\]"),
                                          ("{corruption: shuffle}", "pix2seq.corruption='shuffle': must be none")])
def test_a_bad_pix2seq_section_fails_with_one_line(tmp_path, capsys, section, err):
    r = tmp_path / "r.yaml"
    r.write_text(f"task: pix2seq\npix2seq: {section}\n")
    assert main(["pix2seq", "train", "--recipe", str(r), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and __import__("re").search(err, out[0]), out
    assert not (tmp_path / "o").exists()  # before any work


def test_a_recipe_runs_only_with_its_command(capsys):
    assert main(["finetune", "--recipe", "pix2seq_scenes", "--data", "x", "--out", "/tmp/never"]) == 2
    assert "is a pix2seq recipe; run it with `maskconv pix2seq train`" in capsys.readouterr().err
    assert main(["pix2seq", "train", "--recipe", "convnextv2_atto_finetune", "--data", "x", "--out", "/tmp/never"]) == 2
    assert "is a finetune recipe" in capsys.readouterr().err


def test_flags_only_where_read(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--data", "synthetic", "--pix2seq.bins", "8"])
    assert "--pix2seq.bins" in capsys.readouterr().err


def test_recipe_options_reach_the_model_and_the_run_files(tmp_path):
    from maskconv.data.datasets import find_fashion_mnist
    from maskconv.pix2seq.task import load_pix2seq

    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist not installed")
    from maskconv.data.scenes import make_scenes

    data = make_scenes(tmp_path / "s", "train", 4, 0, size=64, max_items=2).parent
    assert main(["pix2seq", "train", "--recipe", "pix2seq_scenes", "--backbone", "test_convnextv2", "--data", str(data),
                 "--out", str(tmp_path / "r"), "--dim", "32", "--depth", "1", "pix2seq.heads=4",
                 "pix2seq.max_objects=3", "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
                 "optim.epochs=1", "run.max_steps=1", "run.progress=false", "run.device=cpu"]) == 0
    meta = json.loads((tmp_path / "r/pix2seq.json").read_text())
    o = meta["options"]
    # recipe (bins 256 over the 64 px default of 128), flags, key=value and defaults, as used
    assert (o["bins"], o["dim"], o["depth"], o["heads"], o["max_objects"], o["eos_token_weight"], o["seg_top_p"]) == \
        (256, 32, 1, 4, 3, 0.1, 0.8)
    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["task"] == "pix2seq" and saved["pix2seq"] == o  # one record of the options
    model, _, opts = load_pix2seq(tmp_path / "r")
    assert model.decoder.vocab_size == 1000 + 256 and model.decoder.max_len == 5 * 3  # tokenizer: 256 bins, 3 objects
    assert model.decoder.token_embed.embedding_dim == 32 and len(model.decoder.layers) == 1
