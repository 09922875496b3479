"""Config: defaults < recipe < key=value; unknown keys and wrong types fail before any work."""
import pytest

from maskconv.config import Config, ConfigError, flat_keys, load_config


def test_precedence_defaults_recipe_overrides(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("optim.blr: 2.0e-4\noptim:\n  epochs: 7\ndata.img_size: 96\n")
    cfg = load_config(r, ["optim.epochs=3", "model.name=convnext_atto", "optim.betas=0.9,0.999"])
    assert cfg.optim.blr == 2e-4 and cfg.optim.epochs == 3 and cfg.data.img_size == 96
    assert cfg.model.name == "convnext_atto" and cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default
    assert load_config(None, ["optim.lr=none"]).optim.lr is None
    assert load_config(None, ["optim.clip_grad=1"]).optim.clip_grad == 1.0


@pytest.mark.parametrize("override, match", [
    ("optim.bogus=1", "unknown config key 'optim.bogus'"),
    ("nosection.x=1", "unknown config key 'nosection.x'"),
    ("optim.epochs=ten", "optim.epochs: expected an integer"),
    ("optim.epochs=2.5", "optim.epochs: expected an integer"),
    ("run.tensorboard=maybe", "run.tensorboard: expected true/false"),
    ("optim.blr=fast", "optim.blr: expected a number"),
    ("optim.betas=0.9", "expected 2 comma-separated values"),
    ("optim", "not key=value"),
])
def test_bad_overrides_name_the_problem(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_recipe(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe"):
        load_config("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_packaged_recipes_load():
    from pathlib import Path

    import maskconv

    recipes = sorted((Path(maskconv.__file__).parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for r in recipes:
        load_config(r.stem)  # every packaged recipe parses and type-checks


def test_flat_keys_cover_every_field():
    keys = flat_keys()
    assert "optim.blr" in keys and "objective.mask_ratio" in keys and "run.out" in keys


def test_strings_are_verbatim_and_ranges_checked():
    cfg = load_config(None, ["run.out=runs/exp #3", "model.init=ckpt:v2.pt", "data.path=0777", "data.hflip=1"])
    assert cfg.run.out == "runs/exp #3" and cfg.model.init == "ckpt:v2.pt" and cfg.data.path == "0777"
    assert cfg.data.hflip is True
    for bad, match in [("data.batch_size=0", "data.batch_size=0: must be >= 1"),
                       ("run.log_every_steps=0", "must be >= 1"), ("run.seed=inf", "expected an integer"),
                       ("optim.blr=nan", "finite"), ("objective.mask_ratio=1.0", r"in \(0, 1\)"),
                       ("run.amp=fp8", "auto, off, bf16 or fp16"), ("optim.layer_decay_scheme=stage", "single or group")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


def test_cli_refuses_a_recipe_of_another_task(capsys):
    from maskconv.cli import main

    assert main(["pretrain", "--recipe", "convnextv2_atto_finetune", "--out", "/tmp/never"]) == 2
    assert "is a finetune recipe" in capsys.readouterr().err


def test_a_key_given_as_flag_and_as_key_value_is_an_error(tmp_path, capsys):
    # Before: the flag silently won over the key=value, whatever their order.
    from maskconv.cli import main

    for argv in (["--optim.blr", "1e-3", "optim.blr=2e-3"], ["optim.blr=2e-3", "--optim.blr", "1e-3"],
                 ["--out", str(tmp_path / "a"), f"run.out={tmp_path / 'b'}"]):
        assert main(["pretrain", "--model", "test_convnextv2", "--data", "synthetic", *argv]) == 2
        err = capsys.readouterr().err
        assert "is given twice" in err and "give it once" in err
    assert not any(tmp_path.iterdir())


def test_empty_run_out_is_an_error():
    with pytest.raises(ConfigError, match="run.out"):
        load_config(None, ["run.out="])


def test_old_sparse_section_is_read_as_dynamic_sparsity_with_a_warning(tmp_path):
    import json

    import yaml

    from maskconv.cli import _build_parser, config_from_args
    from maskconv.engine.rundir import config_changes
    from maskconv.rebuild import read_run_config

    with pytest.warns(FutureWarning, match="sparse.sparsity is renamed dynamic_sparsity.sparsity"):
        cfg = load_config(overrides=["sparse.sparsity=0.4", "sparse.init=erk"])
    assert (cfg.dynamic_sparsity.sparsity, cfg.dynamic_sparsity.init) == (0.4, "erk")
    recipe = tmp_path / "old.yaml"  # a nested section in an old recipe
    recipe.write_text(yaml.safe_dump({"sparse": {"sparsity": 0.3, "update_every": 7}}))
    with pytest.warns(FutureWarning, match="renamed dynamic_sparsity"):
        cfg = load_config(recipe)
    assert (cfg.dynamic_sparsity.sparsity, cfg.dynamic_sparsity.update_every) == (0.3, 7)
    with pytest.warns(FutureWarning):  # the old flag too, hidden from --help
        args = _build_parser().parse_args(["finetune", "--sparse.sparsity", "0.2", "--data", "synthetic"])
        assert config_from_args(args).dynamic_sparsity.sparsity == 0.2
    with pytest.raises(ConfigError, match="dynamic_sparsity.init='random': must be snip, erk or uniform"):
        with pytest.warns(FutureWarning):
            load_config(overrides=["sparse.init=random"])
    assert load_config(overrides=["objective.sparse=dense"]).objective.sparse == "dense"  # not renamed
    # a run folder written before the rename reads back, and compares equal with its resume's record
    new = load_config(overrides=["dynamic_sparsity.sparsity=0.4"]).to_dict()
    old = json.loads(json.dumps(new))
    old["sparse"] = old.pop("dynamic_sparsity")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**old, "task": "finetune", "resolved": {}}))
    with pytest.warns(FutureWarning):
        assert read_run_config(run)[0].dynamic_sparsity.sparsity == 0.4
    assert config_changes(old, new) == []
    changed = json.loads(json.dumps(new))
    changed["dynamic_sparsity"]["sparsity"] = 0.5
    assert config_changes(old, changed) == [("dynamic_sparsity.sparsity", 0.4, 0.5)]


@pytest.mark.parametrize("key, word, words", [("run.device", "gpu", "auto, cpu or cuda"),
                                              ("run.amp", "fp8", "auto, off, bf16 or fp16"),
                                              ("objective.sparse", "sparse", "gather or dense"),
                                              ("optim.layer_decay_scheme", "stage", "single or group")])
def test_each_vocabulary_is_checked_by_the_config_with_its_words(key, word, words):
    from maskconv.commands import add_config_flags

    with pytest.raises(ConfigError, match=f"{key}='{word}': must be {words}"):
        load_config(overrides=[f"{key}={word}"])
    import argparse

    p = argparse.ArgumentParser()
    add_config_flags(p, "pretrain" if key.startswith("objective") else "finetune")
    import re

    assert words.replace(", ", " | ").replace(" or ", " | ") in re.sub(r"\s+", " ", p.format_help())


def test_a_saved_config_with_old_keys_warns_once_naming_them():
    # a run folder written before the renames: one warning for the file, the values read under the new names
    import warnings

    from maskconv.config import load_saved_config

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = load_saved_config({"sparse.sparsity": 0.3, "sparse.init": "erk", "optim.lr": 1e-3})
    future = [w for w in seen if issubclass(w.category, FutureWarning)]
    assert len(future) == 1 and "sparse.init" in str(future[0].message) and "sparse.sparsity" in str(future[0].message)
    assert cfg.dynamic_sparsity.sparsity == 0.3 and cfg.dynamic_sparsity.init == "erk" and cfg.optim.lr == 1e-3
