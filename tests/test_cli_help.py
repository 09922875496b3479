"""What the CLI prints besides results: per-command help with descriptions, one clean line per fact."""
import warnings

import pytest

from maskconv import create_model, save_weights
from maskconv.cli import main


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_task_help_pages_differ_describe_options_and_list_only_what_the_task_reads(capsys):
    pre, ft, lp = (_help(c, capsys) for c in ("pretrain", "finetune", "linprobe"))
    assert len({pre, ft, lp}) == 3
    # descriptions come from the config fields' comments
    assert "base lr for an effective batch of 256" in pre and "base lr for an effective batch of 256" in lp
    assert "--objective.mask_ratio" in pre and "fraction of patches masked" in pre
    # only what the task reads
    assert "--data.mixup" in ft and "--data.mixup" not in pre and "--data.mixup" not in lp
    assert "--dynamic_sparsity.sparsity" in pre and "--dynamic_sparsity.sparsity" in ft and "--dynamic_sparsity." not in lp
    assert "--objective" not in ft and "--objective" not in lp
    # --recipe names the packaged recipes of that task, not a source path
    assert "fcmae_pretrain_official" in pre and "convnextv2_atto_finetune" not in pre
    assert "convnextv2_atto_finetune" in ft and "src/maskconv/recipes" not in pre + ft + lp


def test_a_flag_the_task_does_not_read_is_refused(capsys):
    with pytest.raises(SystemExit) as e:  # argparse: unrecognized argument, before any work
        main(["pretrain", "--data", "synthetic", "--data.mixup", "0.8"])
    assert e.value.code == 2 and "--data.mixup" in capsys.readouterr().err


def test_init_prints_one_clean_line_and_no_warning(tmp_path, capsys):
    enc = save_weights(create_model("test_convnextv2", num_classes=0), tmp_path / "enc.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["finetune", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(tmp_path / "ft"),
                     "--init", str(enc), "data.img_size=64", "data.batch_size=8", "data.num_workers=0",
                     "run.max_steps=1", "run.progress=false"]) == 0
    assert not [w for w in caught if "left at init" in str(w.message)]
    out = capsys.readouterr().out
    assert out.count("left at init: head.fc.weight, head.fc.bias") == 1


def test_models_without_match_prints_only_the_message(capsys):
    assert main(["models", "x*"]) == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == "no model matches 'x*'" and cap.out == ""
