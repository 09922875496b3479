"""The engine end to end through the CLI: pretrain -> finetune -> eval, exact resume after SIGKILL,
non-finite loss, 2-process gloo DDP == 1 process, refusal of pickled checkpoints."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from maskconv.cli import main

TINY = ["--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false", "objective.decoder_dim=32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "maskconv", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_pretrain_finetune_eval_end_to_end(tmp_path, capsys):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", *TINY, "--out", str(pre), "optim.epochs=1", "optim.blr=1e-3"]) == 0
    cfg = json.loads((pre / "config.json").read_text())
    assert cfg["resolved"]["lr"] == pytest.approx(1e-3 * 8 / 256)  # lr = blr * effective batch / 256
    assert cfg["resolved"]["steps_per_epoch"] == 8
    rows = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and "train_loss" in rows[-1]
    enc = load_file(pre / "encoder.safetensors")
    assert "stem.0.weight" in enc and not any(k.startswith("decoder") for k in enc)
    assert main(["finetune", *TINY, "--out", str(ft), "--init", str(pre / "encoder.safetensors"),
                 "optim.epochs=2", "optim.blr=1e-3", "optim.layer_decay=0.8", "optim.ema_decay=0.9",
                 "data.mixup=0.8", "data.cutmix=1.0", "data.label_smoothing=0.1"]) == 0
    hist = [json.loads(x) for x in (ft / "metrics.jsonl").read_text().splitlines() if "val_top1" in x]
    assert len(hist) == 2 and all(0 <= h["val_top1"] <= 100 for h in hist)
    assert (ft / "model.safetensors").is_file() and (ft / "model_ema.safetensors").is_file()
    assert main(["eval", "--checkpoint", str(ft)]) == 0
    res = json.loads((ft / "eval" / "val" / "eval.json").read_text())
    assert res["images"] == 32 and set(res["weights"]) == {"raw", "ema"}
    for kind in ("raw", "ema"):
        assert len(res[kind]["val_per_class"]) == 4 and sum(map(sum, res[kind]["val_confusion"])) == 32
    assert main(["visualize", "curves", str(ft)]) == 0 and (ft / "curves.png").is_file()


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "r"), "optim.epohcs=3"]) == 2
    assert "unknown config key 'optim.epohcs'" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "r"), "--optim.epochs", "three"]) == 2
    assert "optim.epochs: expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    args = [*TINY, "optim.epochs=2", "optim.blr=1e-3", "run.save_every_steps=1", "run.log_every_steps=1"]
    ref = _cli("pretrain", *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "maskconv", "pretrain", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 180
    while time.time() < deadline:  # kill mid-run, after a few steps (and possibly mid-checkpoint)
        m = run / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "encoder.safetensors").exists(), "the run finished before it could be killed"
    # (a kill mid-write may leave a .tmp file beside last.pt; the rename keeps last.pt itself whole)
    again = _cli("pretrain", *args, "--out", str(run))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    a, b = load_file(tmp_path / "ref" / "objective.safetensors"), load_file(run / "objective.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "r"
    res = _cli("pretrain", *TINY, "--out", str(out), "optim.epochs=1", "optim.lr=1e30", "optim.warmup_epochs=0",
               "run.save_every_steps=1")
    assert res.returncode == 2
    assert "non-finite loss" in res.stderr and "at step" in res.stderr
    ck = torch.load(out / "last.pt", weights_only=True)  # intact and readable
    assert ck["state"]["step"] >= 1


def test_pickled_training_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()

    torch.save({"model": {}, "optimizer": {}, "state": {}, "config": {}, "x": _Evil()}, out / "last.pt")
    res = _cli("pretrain", *TINY, "--out", str(out), "optim.epochs=1")
    assert res.returncode == 2 and "pickled objects" in res.stderr
    assert not os.path.exists("/tmp/maskconv_pwned_train")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/maskconv_pwned_train",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process(tmp_path, mode):
    common = ["finetune", "--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64",
              "data.num_workers=0", "run.progress=false", "optim.epochs=2", "optim.blr=1e-2", "run.log_every_steps=1"]
    one = _cli(*common, "data.batch_size=8", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "maskconv", *common, "data.batch_size=4",
                          f"run.fsdp={mode == 'fsdp'}", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-6000:]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
    assert cfg["world_size"] == 2 and cfg["effective_batch"] == 8

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    l1, l2 = losses("one"), losses("two")
    assert len(l1) == len(l2) == 16
    # Same global batches and gradients; only the float summation order of the all-reduce differs.
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_accumulation_uses_whole_cycles_and_eval_needs_validation_data(tmp_path, capsys):
    out = tmp_path / "acc"
    # 64 images / batch 8 = 8 micro-batches; accum 3 -> 2 steps per epoch, 6 micro-batches, none left over
    assert main(["finetune", *TINY, "--out", str(out), "optim.epochs=2", "optim.accum_steps=3"]) == 0
    res = json.loads((out / "config.json").read_text())["resolved"]
    assert res["steps_per_epoch"] == 2 and res["effective_batch"] == 24
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    assert [r["step"] for r in rows] == [2, 4]
    # a run whose data has no validation split: eval must be told which labeled data to use
    folder = tmp_path / "labeled"
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64), (i * 30, 100 if c == "a" else 0, 0)).save(folder / c / f"{i}.png")
    run = tmp_path / "folder_run"
    assert main(["finetune", "--model", "test_convnextv2", "--data", str(folder), "--out", str(run),
                 "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "run.progress=false",
                 "optim.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 2
    assert "no validation split: pass --data" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--data", str(folder)]) == 0


def test_linprobe_keeps_frozen_backbone_exactly_frozen(tmp_path, capsys):
    # A frozen backbone includes its BatchNorm running statistics (RepLKNet is BN everywhere): only the probe
    # head may change. Before train_mode, loop.fit's model.train() let every BN re-estimate its statistics.
    from maskconv import create_model
    from maskconv.models import save_weights

    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("test_replknet", num_classes=0), init)
    out = tmp_path / "lp"
    assert main(["linprobe", *TINY, "--model", "test_replknet", "--out", str(out), "--init", str(init),
                 "optim.epochs=1", "run.max_steps=3"]) == 0
    before, after = load_file(init), load_file(out / "model.safetensors")
    backbone = [k for k in before if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:
        assert torch.equal(before[k], after[k]), k
    assert "head.fc.1.weight" in after and "head.fc.0.running_mean" in after  # the probe: BN + Linear
    assert not torch.equal(after["head.fc.0.running_mean"], torch.zeros_like(after["head.fc.0.running_mean"]))


def test_rerunning_a_finished_max_steps_run_trains_nothing(tmp_path, capsys):
    # `make demo` re-run with the same --out used to take one extra (lr 0) step and rewrite the checkpoint.
    out = tmp_path / "r"
    args = ["pretrain", *TINY, "--out", str(out), "optim.epochs=1", "run.max_steps=2"]
    assert main(args) == 0
    before = (out / "last.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (out / "last.pt").read_bytes() == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_unreadable_training_files_are_counted_once_and_named(tmp_path, capsys):
    # Two adjacent broken files, two epochs: met 6 times (a file and its broken neighbour), but 2 files.
    import numpy as np
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    (data / "05b_broken.png").write_bytes(b"\x89PNG broken")
    (data / "05c_broken.jpg").write_bytes(b"\xff\xd8 broken")
    assert main(["pretrain", *TINY, "--data", str(data), "--out", str(tmp_path / "r"), "optim.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) skipped:" in out and "05b_broken.png (not a decodable image)" in out and "05c_broken.jpg" in out
