"""Experiment trackers beside ``metrics.jsonl`` (always written): ``run.logger=tensorboard|wandb|mlflow|none``.

Each is imported only when chosen (optional extras) and receives the numeric scalars of every row the loop logs
(``step`` as the x axis; per-class lists and confusion matrices stay in ``metrics.jsonl``). A resumed run keeps
logging into the same tracker run: W&B and MLflow run ids are kept in the run folder (``RunDir.TRACKER_IDS``);
rows after the resumed checkpoint are logged again, as ``metrics.jsonl`` rewrites them (W&B ignores a step at
or below one it already has; MLflow keeps both values of that step).
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

from ..config import Logger, flatten, literal_words
from .rundir import RunDir

TRACKER_IDS = RunDir.TRACKER_IDS  # {"wandb": id, "mlflow": id} of this run folder, so a resume continues them

LOGGERS = literal_words(Logger)  # none | tensorboard | wandb | mlflow


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, less its ``step`` (booleans, lists, dicts and strings left out)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Logger:
    """``log(row)`` per metrics row, ``close()`` at the end of the run."""

    def log(self, row: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _need(module: str, extra: str, kind: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"run.logger={kind} needs the {extra} package: pip install {extra}") from None


def _tracker_id(out: Path, kind: str, new) -> str:
    """This run folder's id in tracker ``kind``: read back on resume, else ``new()`` and recorded."""
    f = out / TRACKER_IDS
    ids = json.loads(f.read_text()) if f.is_file() else {}
    if kind not in ids:
        ids[kind] = new()
        f.write_text(json.dumps(ids, indent=1))
    return ids[kind]


class TensorBoardLogger(Logger):
    def __init__(self, out: Path):
        tb = _need("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(str(out / RunDir.TENSORBOARD))

    def log(self, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, row.get("step", 0))
        self.writer.flush()  # an interrupted run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """Weights & Biases; ``WANDB_MODE=offline`` runs with no account or network (``wandb sync`` uploads later).
    Project: ``WANDB_PROJECT`` or ``maskconv``; files under the run folder (``<run.out>/wandb``)."""

    def __init__(self, out: Path, config: dict):
        wandb = _need("wandb", "wandb", "wandb")
        run_id = _tracker_id(out, "wandb", lambda: secrets.token_hex(6))  # W&B ids: [a-z0-9]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "maskconv"), name=out.name, dir=str(out),
                              config=config, id=run_id, resume="allow", reinit="create_new")

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        # rows of one step (the step's row, then the epoch's) merge; W&B commits a step when a later one arrives
        # and refuses, with a warning, a step below the one it is at (rows re-logged after a resume)
        if step >= max(0, self.run.step):
            self.run.log(scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    """MLflow through ``MlflowClient`` (no global active run). Tracking store: ``MLFLOW_TRACKING_URI`` when set,
    else a local file store in ``<run.out>/mlruns`` (MLflow 3 asks ``MLFLOW_ALLOW_FILE_STORE=true`` for it);
    experiment ``MLFLOW_EXPERIMENT_NAME`` or ``maskconv``; the flattened config as params."""

    def __init__(self, out: Path, config: dict):
        _need("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "maskconv")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        except MlflowException as e:
            raise RuntimeError(f"run.logger=mlflow: MLflow refuses the tracking store {uri} "
                               f"({str(e).splitlines()[0][:160]}); set MLFLOW_TRACKING_URI to a server or database, "
                               "or MLFLOW_ALLOW_FILE_STORE=true for the local file store") from None

        def new() -> str:
            run = self.client.create_run(exp_id, run_name=out.name)
            params = [Param(k, str(v)[:500]) for k, v in sorted(flatten(config).items())]
            for i in range(0, len(params), 100):  # MLflow's log_batch takes at most 100 params
                self.client.log_batch(run.info.run_id, params=params[i:i + 100])
            return run.info.run_id

        self.run_id = _tracker_id(out, "mlflow", new)

    def log(self, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row.get("step", 0))
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def build_logger(kind: str, out: str | Path, config: dict) -> Logger | None:
    """The tracker ``run.logger`` names (None for ``none``); call on the main process only."""
    out = Path(out)
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardLogger(out)
    if kind == "wandb":
        return WandbLogger(out, config)
    if kind == "mlflow":
        return MlflowLogger(out, config)
    raise ValueError(f"run.logger={kind!r}: use one of {', '.join(LOGGERS)}")
