"""The engine end to end through the CLI: pretrain -> finetune -> eval, exact resume after SIGKILL,
non-finite loss, 2-process gloo DDP == 1 process, refusal of pickled checkpoints."""
import json
import os
import re
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
    # The message names the step whose loss went non-finite and the step the checkpoint holds, and that
    # checkpoint's weights are finite (a checkpoint of exploded weights is never written). The loss is read at
    # log / checkpoint steps only (no host sync per micro-batch): save_every_steps=1 reads it every step;
    # save_every_steps=0 + log_every_steps=1 too, and then the NaN stop itself saves the last finite step.
    named = set()
    for every, log in (("1", "10"), ("0", "1")):
        out = tmp_path / f"r{every}"
        res = _cli("pretrain", *TINY, "--out", str(out), "optim.epochs=1", "optim.lr=1e30", "optim.warmup_epochs=0",
                   f"run.save_every_steps={every}", f"run.log_every_steps={log}")
        assert res.returncode == 2
        assert "non-finite loss" in res.stderr and "noticed" not in res.stderr
        step = int(re.search(r"at step (\d+)", res.stderr).group(1))
        stated = int(re.search(r"holds step (\d+)", res.stderr).group(1))
        ck = torch.load(out / "last.pt", weights_only=True)  # intact and readable
        assert ck["state"]["step"] == stated == step - 1 >= 1
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
        named.add(step)
    # read only at the epoch's end (step 8): the same step is named, and no checkpoint of later weights is written
    out = tmp_path / "late"
    res = _cli("pretrain", *TINY, "--out", str(out), "optim.epochs=1", "optim.lr=1e30", "optim.warmup_epochs=0",
               "run.save_every_steps=0", "run.log_every_steps=10")
    assert res.returncode == 2 and "noticed at step 8" in res.stderr
    assert {int(re.search(r"at step (\d+)", res.stderr).group(1))} == named
    assert f"no checkpoint was written yet (none was due before step {min(named)})" in res.stderr
    assert not (out / "last.pt").exists()


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


def _one_vs_two_processes(tmp_path, common: list[str], two_extra: list[str] = ()) -> tuple[list, list]:
    """Run ``common`` as 1 process x batch 8 and as 2 gloo processes x batch 4; their logged losses."""
    one = _cli(*common, "data.batch_size=8", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "maskconv", *common, "data.batch_size=4", *two_extra,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-6000:]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
    assert cfg["world_size"] == 2 and cfg["effective_batch"] == 8

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    return losses("one"), losses("two")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process(tmp_path, mode):
    common = ["finetune", "--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64",
              "data.num_workers=0", "run.progress=false", "optim.epochs=2", "optim.blr=1e-2", "run.log_every_steps=1",
              "optim.ema_decay=0.9", "run.keep_best=ema_val_top1"]
    l1, l2 = _one_vs_two_processes(tmp_path, common, [f"run.fsdp={mode == 'fsdp'}"])
    assert len(l1) == len(l2) == 16
    # Same global batches and gradients; only the float summation order of the all-reduce differs.
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    for f in ("model.safetensors", "model_ema.safetensors", "best.safetensors"):  # FSDP: EMA of the shards
        w1, w2 = load_file(tmp_path / "one" / f), load_file(tmp_path / "two" / f)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=f"{f} {k}")

    def val(run):  # validated on both processes (each its half of the 32 images), raw and EMA weights
        return [{k: v for k, v in json.loads(x).items() if "val_" in k}
                for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if "val_top1" in x]

    v1 = val("one")
    assert len(v1) == 2 and all("ema_val_top1" in r for r in v1) and val("two") == v1
    assert json.loads((tmp_path / "two" / "best.json").read_text()) == json.loads(
        (tmp_path / "one" / "best.json").read_text())


@pytest.mark.parametrize("objective, model", [("fcmae", "test_convnextv2"), ("mae", "test_vit"),
                                              ("convmae", "test_convmae")])
def test_two_process_pretraining_equals_one_process(tmp_path, objective, model):
    # Masks come from each sample's (seed, epoch, global index), not from a per-rank random stream: 2 x 4 must
    # train exactly what 1 x 8 trains (before: FCMAE differed from the first step, weights up to 0.0275 apart).
    common = ["pretrain", "--model", model, "--objective", objective, "--data", "synthetic", "data.img_size=64",
              "data.num_workers=0", "run.progress=false", "optim.epochs=1", "run.max_steps=4", "optim.lr=2e-3",
              "optim.warmup_epochs=0", "run.log_every_steps=1", "objective.decoder_dim=32", "objective.decoder_depth=1"]
    l1, l2 = _one_vs_two_processes(tmp_path, common)
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "objective.safetensors"), load_file(tmp_path / "two" / "objective.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("attn.qkv.bias"):  # the key bias: softmax over keys is shift-invariant, so its gradient is
            d = a.shape[0] // 3  # zero up to float noise, which Adam scales to +-lr steps; compare q and v only
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


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


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc: the workers are the launcher's children)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"RANK={rank}".encode() in env:
            return int(d)
    return None


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    # run.dist_timeout_minutes=0.25: rank 0 gives up on the SIGSTOPped rank 1 after 15 s (before: 60 minutes);
    # torchrun then ends the job (its SIGTERM grace is 30 s; SIGKILL reaches a stopped process).
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", "-m", "maskconv", "finetune", *TINY, "optim.epochs=50",
                             "data.batch_size=4", "run.log_every_steps=1", "run.dist_timeout_minutes=0.25",
                             "--out", str(run)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err.txt", "w"), env=ENV)
    victim = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None
        os.kill(victim, signal.SIGSTOP)
        t0 = time.time()
        proc.wait(timeout=15 + 30 + 60)
        assert proc.returncode != 0
        assert time.time() - t0 < 15 + 30 + 60  # measured: 49 s
        assert "did not answer within run.dist_timeout_minutes" in (tmp_path / "err.txt").read_text()
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
