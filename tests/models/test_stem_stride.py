"""`stem_stride` (maskconv) vs `patch_size` (timm): the same network wherever timm builds one, weights that load
strict into timm with the same outputs, and the old `model.patch_size` key still read."""
import json

import pytest
import torch

import maskconv

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("s", [1, 3, 4])
def test_weights_of_any_timm_buildable_stem_load_strict_into_timm(tmp_path, s):
    ours = maskconv.create_model("convnextv2_atto", stem_stride=s, in_chans=1, num_classes=5).eval()
    path = maskconv.save_weights(ours, tmp_path / "w.safetensors")
    theirs = timm.create_model("convnextv2_atto", patch_size=s, in_chans=1, num_classes=5).eval()
    timm.models.load_checkpoint(theirs, str(path), strict=True)  # timm's own reader, every key and shape
    x = torch.randn(2, 1, 32 * s, 48 * s)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    # timm's argument name builds the same network in maskconv
    same = maskconv.create_model("convnextv2_atto", patch_size=s, in_chans=1, num_classes=5)
    same.load_state_dict(ours.state_dict())
    assert same.stride == ours.stride == 8 * s


@pytest.mark.parametrize("s", [2, 8])
def test_timm_patch_size_that_builds_another_network_is_refused(s):
    with pytest.raises(ValueError, match=f"use stem_stride={s}"):
        maskconv.create_model("convnextv2_atto", patch_size=s)
    assert maskconv.create_model("convnextv2_atto", stem_stride=s).stride == 8 * s  # ours, without timm twin
    t = timm.create_model("convnextv2_atto", patch_size=s)
    ours = maskconv.create_model("convnextv2_atto", stem_stride=s)
    if s == 2:  # timm: an extra stage-0 downsample, so its keys differ
        assert any(k.startswith("stages.0.downsample.") for k in t.state_dict())
        assert not any(k.startswith("stages.0.downsample.") for k in ours.state_dict())
    else:  # same keys, but timm dilates the last stage: other outputs
        t.load_state_dict(ours.state_dict())
        x = torch.randn(1, 3, 128, 128)
        with torch.no_grad():
            assert (t.eval()(x) - ours.eval()(x)).abs().max() > 1e-2


def test_old_patch_size_key_is_read_as_stem_stride(tmp_path):
    from safetensors.torch import load_file, save_file

    from maskconv.config import load_config
    from maskconv.pretrain import create_objective, load_objective, save_objective
    from maskconv.rebuild import read_run_config

    with pytest.warns(FutureWarning, match="model.patch_size is renamed model.stem_stride"):
        cfg = load_config(overrides=["model.patch_size=2"])
    assert cfg.model.stem_stride == 2
    from maskconv.cli import _build_parser, config_from_args

    with pytest.warns(FutureWarning):  # the old flag too
        args = _build_parser().parse_args(["finetune", "--model.patch_size", "2", "--data", "synthetic"])
        assert config_from_args(args).model.stem_stride == 2
    run = tmp_path / "run"  # a run folder written before the rename
    run.mkdir()
    saved = cfg.to_dict()
    saved["model"]["patch_size"] = saved["model"].pop("stem_stride")
    (run / "config.json").write_text(json.dumps({**saved, "task": "finetune", "resolved": {}}))
    with pytest.warns(FutureWarning):
        assert read_run_config(run)[0].model.stem_stride == 2
    # an objective file written before the rename (its model kwargs say patch_size=2, meaning the stem stride)
    obj = create_objective("fcmae", model="test_convnextv2", model_kwargs=dict(stem_stride=2), decoder_dim=16)
    f = save_objective(obj, tmp_path / "o.safetensors")
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    meta["model_kwargs"] = json.dumps({"patch_size": 2})
    save_file(load_file(f), tmp_path / "old.safetensors", metadata=meta)
    assert load_objective(tmp_path / "old.safetensors").encoder.stride == 16
