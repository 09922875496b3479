"""run.logger: TensorBoard, W&B (offline) and MLflow (local file store) receive the loop's rows; a resumed run
continues the same tracker run. Each test is skipped when its package is not installed."""
import json

import pytest

from maskconv.engine.loggers import TRACKER_IDS, build_logger, scalars

ROWS = [dict(step=1, epoch=0.5, loss=2.5, lr=1e-3), dict(step=2, epoch=1, train_loss=2.25, lr=2e-3, val_top1=50.0,
                                                           val_per_class=[40.0, 60.0], flag=True)]
CONFIG = {"model": {"name": "test_convnextv2"}, "optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "task": "pretrain"}


def test_scalars_keep_finite_numbers_only():
    assert scalars(ROWS[1]) == {"epoch": 1.0, "train_loss": 2.25, "lr": 2e-3, "val_top1": 50.0}
    assert scalars({"step": 3, "loss": float("nan"), "x": "text"}) == {}
    assert build_logger("none", ".", {}) is None
    with pytest.raises(ValueError, match="run.logger='neptune': use one of none, tensorboard, wandb, mlflow"):
        build_logger("neptune", ".", {})


def test_tensorboard_logger_writes_the_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = build_logger("tensorboard", tmp_path, CONFIG)
    for row in ROWS:
        log.log(row)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert [(e.step, e.value) for e in acc.Scalars("val_top1")] == [(2, 50.0)]
    assert "val_per_class" not in acc.Tags()["scalars"]


def test_wandb_offline_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    log = build_logger("wandb", out, CONFIG)
    log.log(ROWS[0])
    log.log(dict(step=1, epoch=1, train_loss=2.0))  # the epoch's row at the same step: merged into step 1
    log.log(ROWS[1])  # a later step commits step 1
    assert log.run.summary["loss"] == 2.5 and log.run.summary["train_loss"] == 2.0
    assert log.run.config["optim"]["lr"] == 0.001
    first = log.run.id
    log.close()
    again = build_logger("wandb", out, CONFIG)  # a resumed run: same id, kept in the run folder
    assert again.run.id == first == json.loads((out / TRACKER_IDS).read_text())["wandb"]
    again.log(dict(step=3, loss=1.5))
    again.log(dict(step=4, loss=1.25))
    assert again.run.summary["loss"] == 1.5
    again.close()
    runs = list((out / "wandb").glob(f"offline-run-*-{first}"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs)  # one offline record per attempt


def test_mlflow_file_store_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the local file store is opt-in
    out = tmp_path / "run"
    out.mkdir()
    log = build_logger("mlflow", out, CONFIG)
    log.log(ROWS[0])
    log.close()
    again = build_logger("mlflow", out, CONFIG)
    assert again.run_id == log.run_id
    again.log(ROWS[1])
    again.close()
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(log.run_id, "lr")] == [(1, 1e-3), (2, 2e-3)]
    assert [(m.step, m.value) for m in client.get_metric_history(log.run_id, "loss")] == [(1, 2.5)]
    run = client.get_run(log.run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.name"] == "test_convnextv2"
    assert "val_per_class" not in run.data.metrics and run.info.status == "FINISHED"


def test_old_tensorboard_key_reads_as_run_logger():
    from maskconv.config import ConfigError, load_config, validate

    with pytest.warns(FutureWarning, match="run.tensorboard is replaced by run.logger"):
        assert load_config(None, ["run.tensorboard=true"]).run.logger == "tensorboard"
    with pytest.warns(FutureWarning, match="nothing to set"):
        assert load_config(None, ["run.logger=wandb", "run.tensorboard=false"]).run.logger == "wandb"
    with pytest.raises(ConfigError, match="run.logger='neptune': must be none, tensorboard, wandb or mlflow"):
        validate(load_config(None, ["run.logger=neptune"]))


def test_a_training_run_logs_its_rows_to_mlflow(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from maskconv.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "test_convnextv2", "--data", "synthetic", "--out", str(out), "data.img_size=64",
                 "data.batch_size=16", "data.num_workers=0", "run.progress=false", "optim.epochs=1", "optim.lr=1e-3",
                 "run.log_every_steps=1", "run.logger=mlflow"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((out / TRACKER_IDS).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r] and len(logged) == 4
    top1 = client.get_metric_history(run_id, "val_top1")
    assert [(m.step, m.value) for m in top1] == [(4, pytest.approx(rows[-1]["val_top1"]))]
    assert client.get_run(run_id).data.params["run.logger"] == "mlflow"
