"""Runs you can trust: one owner per run folder, append-only provenance, torn logs, stale temp files, a full
disk, resume errors in one line, Ctrl-C / SIGTERM, time-based checkpoints, the resolved-lr line, EMA warm-up."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from maskconv.cli import main

TINY = ["--model", "test_convnextv2", "--data", "synthetic", "data.img_size=64", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false", "objective.decoder_dim=32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "maskconv", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskconv", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _wait_rows(run, n, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} metric rows before the run ended")


def _same_weights(a, b):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_second_process_on_the_same_out_is_refused_and_the_first_equals_a_solo_run(tmp_path):
    # Both start together (different lrs, as in the report): whichever locks the folder first trains; the other
    # exits non-zero with one line naming it; the winner's result equals a solo run with its settings.
    args = [*TINY, "optim.epochs=4", "run.log_every_steps=1"]
    procs = {lr: _popen("pretrain", *args, f"optim.lr={lr}", "--out", str(tmp_path / "shared")) for lr in ("1e-3", "5e-3")}
    ends = {lr: p.communicate(timeout=300) for lr, p in procs.items()}
    rcs = sorted(p.returncode for p in procs.values())
    assert rcs == [0, 2], {lr: e[1][-500:] for lr, e in ends.items()}
    won = next(lr for lr, p in procs.items() if p.returncode == 0)
    lost = next(lr for lr in procs if lr != won)
    lines = ends[lost][1].strip().splitlines()
    assert len(lines) == 1 and "is in use by" in lines[0] and f"pid {procs[won].pid} " in lines[0], lines
    solo = _cli("pretrain", *args, f"optim.lr={won}", "--out", str(tmp_path / "solo"))
    assert solo.returncode == 0, solo.stderr
    _same_weights(tmp_path / "shared" / "objective.safetensors", tmp_path / "solo" / "objective.safetensors")

    def rows(run):  # no duplicated or interleaved rows: the same steps and losses as the solo run
        return [(r["step"], r.get("loss"), r.get("train_loss")) for r in
                map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert rows("shared") == rows("solo")


def test_stale_lock_of_a_dead_owner_is_taken_over(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on elsewhere\n")  # written by a process that died without releasing
    assert main(["pretrain", *TINY, "--out", str(out), "optim.epochs=1", "run.max_steps=1"]) == 0
    assert "left locked by pid 999999 on elsewhere" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""  # a clean end leaves the lock file empty


def test_resume_with_other_settings_is_refused_writes_nothing_and_override_is_recorded(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["pretrain", *TINY, "--out", str(out), "optim.epochs=2", "run.max_steps=3", "optim.blr=1e-3"]
    assert main(base) == 0
    before = _snapshot(out)
    capsys.readouterr()
    for change in (["optim.blr=2e-3"], ["data.batch_size=4"], ["objective.mask_ratio=0.5"]):
        assert main([*base, *change]) == 2
        err = capsys.readouterr().err
        assert "refusing to resume" in err and "step 3" in err and change[0].split("=")[0] in err, err
        assert _snapshot(out) == before  # config.json, metrics, last.pt: byte-identical
    # the override continues (extends) the run and records what changed and from which step
    assert main([*base[:-2], "run.max_steps=5", "optim.blr=2e-3", "--allow-config-change"]) == 0
    assert (out / "config.json").read_bytes() == before["config.json"]  # the start record is never rewritten
    hist = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and hist[0]["step"] == 3
    assert hist[0]["changes"]["optim.blr"] == [1e-3, 2e-3] and hist[0]["changes"]["run.max_steps"] == [3, 5]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["config_history"] == hist and ck["state"]["step"] == 5
    # resuming with the new settings again is no change
    assert main([*base[:-2], "run.max_steps=5", "optim.blr=2e-3"]) == 0


def test_changed_data_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(16):
        Image.new("RGB", (64, 64), (i * 10, 50, 0)).save(data / f"{i}.png")
    out = tmp_path / "r"
    args = ["pretrain", *TINY, "--data", str(data), "--out", str(out), "optim.epochs=1", "run.max_steps=1"]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["resolved"]["data_fingerprint"].startswith("16 files")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(data / "3.png")  # same names and count, one file rewritten
    (data / "3.png").write_bytes((data / "3.png").read_bytes() + b"\0" * 7)
    capsys.readouterr()
    assert main(args) == 2
    assert "resolved.data_fingerprint" in capsys.readouterr().err


def test_empty_run_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", *TINY, "run.out=", "optim.epochs=1"]) == 2
    assert "run.out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_saves_and_resumes_exactly_after_torn_metrics_and_stale_tmp(tmp_path):
    args = [*TINY, "optim.epochs=2", "optim.lr=1e-3", "run.log_every_steps=1"]
    run = tmp_path / "stopped"
    proc = _popen("pretrain", *args, "--out", str(run))
    _wait_rows(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = torch.load(run / "last.pt", weights_only=True)["state"]["step"]
    assert err.strip().splitlines()[-1] == f"maskconv: stopped at step {step}; re-run the same command to resume"
    assert "Traceback" not in err
    with open(run / "metrics.jsonl", "a") as f:  # a crash mid-append
        f.write('{"step": 99, "lo')
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"\0" * 1000)  # a killed checkpoint write
    again = _cli("pretrain", *args, "--out", str(run))
    assert again.returncode == 0, again.stderr
    assert f"{run / 'metrics.jsonl'}: trimmed a torn last line" in again.stdout
    assert "removed stale temporary files" in again.stdout and not (run / ".last.pt.k1ll3d.tmp").exists()
    assert f"resumed from {run / 'last.pt'}: epoch 0, step {step}" in again.stdout
    ref = _cli("pretrain", *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    _same_weights(run / "objective.safetensors", tmp_path / "ref" / "objective.safetensors")


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "r"
    proc = _popen("pretrain", *TINY, "--out", str(run), "optim.epochs=3", "run.log_every_steps=1")
    _wait_rows(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    step = torch.load(run / "last.pt", weights_only=True)["state"]["step"]
    assert step >= 2 and f"stopped at step {step}; re-run the same command to resume" in err
    assert "Traceback" not in err


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import maskconv.engine.checkpoint as C

    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(C.torch, "save", save)
    out = tmp_path / "r"
    assert main(["pretrain", *TINY, "--out", str(out), "optim.epochs=1", "run.save_every_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0] and "last.pt is kept" in err[0]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 1
    assert not list(out.glob(".*.tmp"))


def test_resume_with_other_decoder_or_unknown_state_field_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["pretrain", *TINY, "--out", str(out), "optim.epochs=1", "run.max_steps=1"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "objective.decoder_dim=16", "--allow-config-change"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this model" in err[0]
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["state"]["bogus_field"] = 1
    torch.save(ck, out / "last.pt")
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus_field" in err[0]


def test_time_based_checkpoint_protects_a_long_epoch(tmp_path, monkeypatch):
    # Neither the step nor the epoch cadence reaches step 3 of an 8-step epoch; run.save_every_minutes does.
    import maskconv.tasks.pretrain as T
    from maskconv.config import load_config

    real_fit = T.fit

    def crashing_fit(*a, **k):  # the loss of step 4 raises, as a crash would
        loss_fn, calls = a[4], []

        def loss(*x, **kw):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("simulated crash")
            return loss_fn(*x, **kw)
        return real_fit(*a[:4], loss, *a[5:], **k)

    monkeypatch.setattr(T, "fit", crashing_fit)

    def run(minutes):
        cfg = load_config(None, [f"run.out={tmp_path / str(minutes)}", "model.name=test_convnextv2", "data.path=synthetic",
                                 "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "run.progress=false",
                                 "objective.decoder_dim=32", "optim.epochs=1", f"run.save_every_minutes={minutes}"])
        with pytest.raises(RuntimeError, match="simulated crash"):
            T.run_pretrain(cfg)
        return tmp_path / str(minutes) / "last.pt"

    assert not run(0).exists()  # 0 = off: the first three steps were unprotected
    assert torch.load(run(1e-9), weights_only=True)["state"]["step"] == 3


def test_progress_total_is_max_steps_and_lr_rule_is_printed_with_a_warning(tmp_path, capsys):
    assert main(["pretrain", *TINY, "run.progress=true", "--out", str(tmp_path / "r"), "optim.epochs=1",
                 "run.max_steps=2"]) == 0
    cap = capsys.readouterr()
    assert "2/2 [" in cap.err and "/8 [" not in cap.err  # the bar ends full, at max_steps, not at 2/8
    assert "lr 4.69e-06 = blr 0.00015 x batch 8 / 256" in cap.out
    assert "warning: lr 4.69e-06" in cap.out and "implausibly small for pretrain" in cap.out
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "q"), "optim.epochs=1", "run.max_steps=1",
                 "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "lr 0.001 (optim.lr)" in out and "warning" not in out


def test_ema_warmup_follows_the_weights_in_a_short_run(tmp_path):
    from maskconv import create_model

    out = tmp_path / "ft"
    assert main(["finetune", *TINY, "--out", str(out), "optim.epochs=1", "run.max_steps=6", "optim.lr=5e-3",
                 "optim.warmup_epochs=0", "optim.ema_decay=0.9999"]) == 0
    torch.manual_seed(0)  # _supervised seeds run.seed before building the classifier
    init = create_model("test_convnextv2", num_classes=4).state_dict()
    trained, ema = load_file(out / "model.safetensors"), load_file(out / "model_ema.safetensors")
    moved = [k for k in trained if trained[k].is_floating_point() and not torch.equal(trained[k], init[k])]
    assert moved
    d_trained = sum((ema[k] - trained[k]).norm() ** 2 for k in moved) ** 0.5
    d_init = sum((ema[k] - init[k]).norm() ** 2 for k in moved) ** 0.5
    assert d_trained < 0.5 * d_init  # without warm-up (decay 0.9999 from step 1) the EMA sits at the init


def test_ema_warmup_rule_is_timms():
    from torch.optim.swa_utils import AveragedModel

    from maskconv.engine.loop import ema_warmup_fn

    net = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(net, multi_avg_fn=ema_warmup_fn(0.9999, True), use_buffers=True)
    expect = None
    for t in range(1, 6):
        net.weight.data.fill_(float(t))
        ema.update_parameters(net)
        # timm ModelEmaV3.get_decay: 1 - (1 + step / gamma) ** -power, gamma 1, power 2/3; first update copies
        expect = float(t) if expect is None else (lambda d: d * expect + (1 - d) * t)(1 - (1 + t - 1) ** (-2 / 3))
        assert ema.module.weight.item() == pytest.approx(expect, rel=1e-6)


def test_finetune_into_a_pretraining_run_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    # Before: config.json was rewritten and classes.json added before the refusal.
    out = tmp_path / "r"
    assert main(["pretrain", *TINY, "--out", str(out), "optim.epochs=1", "run.max_steps=1"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["finetune", *TINY, "--out", str(out), "optim.epochs=1"]) == 2
    assert "a pretrain run of test_convnextv2; this is a finetune run" in capsys.readouterr().err
    assert _snapshot(out) == before and not (out / "classes.json").exists()
