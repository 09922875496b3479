"""A run checkpointed by maskconv before the issue-12 refactor (commit 0dca71e: config section ``sparse``, not
``dynamic_sparsity``) resumes and ends with the weights of an uninterrupted run.

The old run folder is made here from a run of the current code, rewritten into the old format, because a real
one (2.3 MB) is too big to keep in the repository. ``data/run_format_0dca71e.json`` is the format that commit
wrote (every key of ``last.pt``'s config / resolved / state and of ``config.json``, with value types; written by
0dca71e itself on this very config), so the rewrite is checked against it, key by key. At the interruption point
the old code's checkpoint and the current code's held bit-identical weights and training state (checked once
when the manifest was made; see docs/DECISIONS.md)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import maskconv.engine.loop as L
from maskconv.config import load_config
from maskconv.tasks.pretrain import run_pretrain

OLD = json.loads((Path(__file__).parent / "data" / "run_format_0dca71e.json").read_text())
ARGS = ["model.name=test_convnextv2", "data.path=synthetic", "data.img_size=64", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false", "objective.decoder_dim=16", "optim.epochs=2", "optim.blr=1e-3",
        "run.save_every_steps=3", "run.log_every_steps=1", "optim.ema_decay=0.9", "dynamic_sparsity.sparsity=0.5",
        "dynamic_sparsity.update_every=2", "dynamic_sparsity.init=erk"]


def _type(v) -> str:
    if isinstance(v, dict):
        return "dict"
    return "tensor" if torch.is_tensor(v) else type(v).__name__


def _as_old(d: dict, fmt: dict, where: str) -> dict:
    """``d`` with the keys and nesting of the old format ``fmt`` (renamed sections back to their old names);
    fails when ``d`` cannot give a key the old format had."""
    d = dict(d)
    if "dynamic_sparsity" in d:
        d["sparse"] = d.pop("dynamic_sparsity")
    if "logger" in d and "tensorboard" in fmt:  # run.tensorboard (bool) became run.logger
        d["tensorboard"] = d.pop("logger") == "tensorboard"
    out = {}
    for k, want in fmt.items():
        assert k in d, f"{where}.{k}: the old format has it, the current run does not"
        v = d[k]
        if isinstance(want, dict):
            out[k] = _as_old(v, want, f"{where}.{k}")
        else:
            got = _type(v) if not want.startswith(("dict[", "list[")) else want
            assert want == got or want in ("dict", "list") or "NoneType" in (want, got), (where, k, want, got)
            out[k] = v
    return out


def _run(out: Path, stop_after_saves: int | None = None, monkeypatch=None):
    if stop_after_saves is not None:
        real, saves = L.save_training_checkpoint, []

        class Stop(Exception):
            pass

        def save(path, payload):
            real(path, payload)
            saves.append(path)
            if len(saves) == stop_after_saves:
                raise Stop  # as a crash right after a checkpoint

        monkeypatch.setattr(L, "save_training_checkpoint", save)
        with pytest.raises(Stop):
            run_pretrain(load_config(None, [*ARGS, f"run.out={out}"]))
        monkeypatch.undo()
        return None
    return run_pretrain(load_config(None, [*ARGS, f"run.out={out}"]))


def test_a_run_checkpointed_before_the_refactor_resumes_exactly(tmp_path, monkeypatch):
    run = tmp_path / "old"
    _run(run, stop_after_saves=2, monkeypatch=monkeypatch)  # steps 3 and 6 of 16 saved
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["state"]["step"] == 6
    top = OLD["last.pt"]
    old = {k: ck[k] for k in top if k not in ("config", "resolved", "state", "rng")}
    old.update(config=_as_old(ck["config"], top["config"], "config"), resolved=_as_old(ck["resolved"], top["resolved"],
               "resolved"), state=_as_old(ck["state"], top["state"], "state"), rng=ck["rng"])
    assert set(old) == set(top)  # exactly the old top-level keys
    assert "sparse" in old["config"] and "dynamic_sparsity" not in old["config"]
    torch.save(old, run / "last.pt")
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(_as_old(saved, OLD["config.json"], "config.json"), indent=1))

    res = _run(run)  # the current code resumes the old folder with the same settings
    assert res.state.step == 16
    ref = _run(tmp_path / "ref")  # uninterrupted
    a, b = load_file(ref.out / "objective.safetensors"), load_file(run / "objective.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
