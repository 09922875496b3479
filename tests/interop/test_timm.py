"""timm both ways: maskconv's models built by ``timm.create_model`` (``maskconv_<name>``), timm's ``features_only``,
``save_pretrained`` folders read by timm's ``local-dir:`` / ``hf-hub:`` loaders and by maskconv, folders timm wrote
read by maskconv; the Hugging Face cache is read offline only."""
import json
import subprocess
import sys

import pytest
import torch

import maskconv
from maskconv.models import CheckpointError
from maskconv.models import hub as hub_mod
from tests.conftest import perturbed_state_dict

timm = pytest.importorskip("timm")

# every maskconv family (the ones timm lacks first), at their tiny test sizes; (name, input side)
FAMILIES = [("test_slak", 64), ("test_replknet", 64), ("test_convmae", 64), ("test_vit", 64), ("test_convnextv2", 64)]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    maskconv.register_with_timm()


def _ours(name, **kw):
    """A maskconv model with perturbed weights (zero-initialised parameters take part too)."""
    model = maskconv.create_model(name, **kw).eval()
    model.load_state_dict(perturbed_state_dict(model))
    return model


def test_registration_is_explicit_idempotent_and_shadows_nothing():
    code = (
        "import warnings, timm, maskconv\n"
        "warnings.simplefilter('error')\n"
        "before = set(timm.list_models())\n"
        "assert not any(n.startswith('maskconv_') for n in before), 'import maskconv registered models in timm'\n"
        "names = maskconv.register_with_timm()\n"
        "assert names == ['maskconv_' + n for n in maskconv.list_models()], names\n"
        "assert maskconv.register_with_timm() == names\n"  # a second call: no overwrite warning (an error here)
        "assert set(timm.list_models()) - before == set(names)\n"
        "assert before <= set(timm.list_models())\n"
        "for n in ('test_convnext', 'convnextv2_atto', 'test_vit'):\n"  # names both have: still timm's models
        "    assert type(timm.create_model(n)).__module__.startswith('timm.'), n\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("name,side", FAMILIES)
def test_timm_create_model_builds_ours_with_equal_logits(name, side):
    ours = _ours(name, num_classes=7)
    ref = timm.create_model(f"maskconv_{name}", num_classes=7).eval()
    assert type(ref) is type(ours)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))
    assert ref.pretrained_cfg["first_conv"] == ours.first_conv  # timm adapts this conv for other in_chans


def test_timm_builds_the_published_slak_size():
    ref = timm.create_model("maskconv_slak_tiny")
    ours = maskconv.create_model("slak_tiny")
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_timm_pretrained_file_reads_official_layouts_through_our_filter(tmp_path):
    """timm's own ``pretrained=True`` path runs the family's checkpoint filter: an official FB ConvNeXt-V2 file
    (``downsample_layers``, ``pwconv1``, GRN (1, 1, 1, C)) builds in timm with the official logits."""
    from tests.models._official import OfficialConvNeXt

    off = OfficialConvNeXt((1, 1, 2, 1), (8, 16, 32, 64), v2=True, num_classes=5).eval()
    off.load_state_dict(perturbed_state_dict(off))
    torch.save({"model": off.state_dict()}, tmp_path / "official.pth")
    ref = timm.create_model("maskconv_test_convnextv2", num_classes=5, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth"))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ref(x) - off(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,side", FAMILIES)
def test_timm_features_only_returns_our_stage_maps(name, side):
    ours = _ours(name)
    n = len(ours.feature_info)
    idx = (1, n - 1)
    feats = timm.create_model(f"maskconv_{name}", features_only=True, out_indices=idx).eval()
    feats.load_state_dict({f"model.{k}": v for k, v in ours.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        got = feats(x)
        want = ours.forward_intermediates(x, indices=list(idx), intermediates_only=True)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert feats.feature_info.channels() == [ours.feature_info[i]["num_chs"] for i in idx]
    assert feats.feature_info.reduction() == [ours.feature_info[i]["reduction"] for i in idx]
    assert [m.shape[-1] for m in got] == [side // r for r in feats.feature_info.reduction()]
    default = timm.create_model(f"maskconv_{name}", features_only=True)
    assert len(default.feature_info.channels()) == (3 if name == "test_vit" else n)  # timm's defaults
    # timm's data config follows this build's arguments (resolve_data_config reads pretrained_cfg)
    one = timm.create_model(f"maskconv_{name}", in_chans=1, num_classes=3)
    assert one.pretrained_cfg["input_size"][0] == 1 and one.pretrained_cfg["num_classes"] == 3


@pytest.mark.parametrize("name,side", FAMILIES)
def test_save_pretrained_folder_loads_in_timm_and_maskconv(tmp_path, name, side):
    ours = _ours(name, num_classes=5, in_chans=2)  # build arguments must travel with the folder
    folder = maskconv.save_pretrained(ours, tmp_path / "w", provenance={"run": "unit-test", "epochs": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == f"maskconv_{name}" and cfg["num_classes"] == 5
    assert cfg["pretrained_cfg"]["input_size"][0] == 2
    prov = cfg["maskconv"]
    assert (prov["version"], prov["model"], prov["run"], prov["epochs"]) == (maskconv.__version__, name, "unit-test", 3)
    assert prov["model_args"] == {"num_classes": 5, "in_chans": 2}

    x = torch.randn(2, 2, side, side)
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    back = maskconv.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ours(x)
        assert torch.equal(ref(x), want)
        assert torch.equal(back(x), want)
    assert ref.num_classes == back.num_classes == 5
    # timm's features over the same folder: the classifier is dropped, the maps are ours
    feats = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
    last = len(ours.feature_info) - 1  # every default ends at the last level
    with torch.no_grad():
        assert torch.equal(feats(x)[-1], ours.forward_intermediates(x, indices=[last], intermediates_only=True)[0])
    # the same folder as a weights source for a named model, and a folder saved by a timm-built model
    named = maskconv.create_model(name, num_classes=5, in_chans=2, pretrained=f"local-dir:{folder}").eval()
    again = maskconv.save_pretrained(ref, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(named(x), want)
        assert torch.equal(maskconv.from_pretrained(again).eval()(x), want)


def test_maskconv_reads_a_folder_timm_wrote(tmp_path):
    ref = timm.create_model("convnext_atto", num_classes=5).eval()
    ref.load_state_dict(perturbed_state_dict(ref))
    timm.models.save_for_hf(ref, tmp_path / "t", safe_serialization=True)
    ours = maskconv.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # two implementations of the same model: the project's timm parity bound
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    arch = maskconv.create_model(f"local-dir:{tmp_path / 't'}")  # architecture only, as timm without pretrained
    assert arch.num_classes == 5 and not torch.equal(arch.head.fc.weight, ours.head.fc.weight)


def _fake_hf_cache(cache, repo, folder):
    """The Hugging Face cache layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hf_hub_source_reads_the_cache_offline(tmp_path, monkeypatch):
    hfh = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", True)  # timm's hf-hub loader must not reach the network
    ours = _ours("test_slak", num_classes=4)
    cache = tmp_path / "cache"
    _fake_hf_cache(cache, "someone/slak-test", maskconv.save_pretrained(ours, tmp_path / "w"))
    x = torch.randn(1, 3, 64, 64)
    mine = maskconv.create_model("hf-hub:someone/slak-test", pretrained=True, cache_dir=cache).eval()
    theirs = timm.create_model("hf-hub:someone/slak-test", pretrained=True, cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(mine(x), ours(x)) and torch.equal(theirs(x), ours(x))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*never downloads"):
        maskconv.create_model("hf-hub:someone/absent", pretrained=True, cache_dir=cache)


def test_bad_folders_and_arguments_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        maskconv.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        maskconv.create_model(f"local-dir:{tmp_path / 'absent'}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 3}))
    with pytest.raises(CheckpointError, match="'resnet50', which maskconv does not have"):
        maskconv.from_pretrained(tmp_path / "other")
    folder = maskconv.save_pretrained(maskconv.create_model("test_slak"), tmp_path / "ok")
    with pytest.raises(ValueError, match="pass pretrained=True"):
        maskconv.create_model(f"local-dir:{folder}", pretrained=str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="architecture"):
        maskconv.save_pretrained(maskconv.models.ConvNeXt(depths=(1,), dims=(8,)), tmp_path / "bare")
    with pytest.raises(ValueError, match="features_only wrapper"):
        maskconv.save_pretrained(timm.create_model("maskconv_test_slak", features_only=True), tmp_path / "feats")
    with pytest.raises(ValueError, match="provenance must be JSON"):
        maskconv.save_pretrained(maskconv.create_model("test_slak"), tmp_path / "p", provenance={"f": object()})
    assert not (tmp_path / "p").exists()


def test_a_failed_save_never_leaves_new_weights_under_an_old_config(tmp_path, monkeypatch):
    folder = maskconv.save_pretrained(maskconv.create_model("test_slak", num_classes=3), tmp_path / "w")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hub_mod, "save_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        maskconv.save_pretrained(maskconv.create_model("test_replknet", num_classes=3), folder)
    with pytest.raises(CheckpointError, match="no config.json"):  # refused, never a test_slak config + other weights
        maskconv.from_pretrained(folder)
