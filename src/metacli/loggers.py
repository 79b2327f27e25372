"""Logging backends besides metrics.jsonl (which is always written): TensorBoard, MLflow.

A sink gets every metrics.jsonl record as it is written and is closed with the run's
final status. Records carry ``iteration`` and ``split`` (train, val, test); each other
number becomes a scalar ``<split>/<key>``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from metacli.config import flatten
from metacli.errors import ConfigError
from metacli.extras import require_extra


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record as ``split/key`` scalars (lists and strings left out)."""
    split = record.get("split", "train")
    return {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("iteration", "split")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def flat_params(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """The config as flat ``a.b.c`` -> value pairs (hparams, MLflow params)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v if isinstance(v, (int, float, bool, str)) else str(v) for k, v in flat.items()}


class TensorBoardSink:
    """Event files in ``<run>/tensorboard``; the config and final metrics as hparams."""

    def __init__(self, cfg: DictConfig, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))
        self.params = flat_params(cfg)
        self.last: dict[str, float] = {}

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("iteration", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
            self.last[f"hparam/{tag}"] = value
        self.writer.flush()

    def close(self, status: str) -> None:
        wanted = ("hparam/test/metric", "hparam/val/metric")
        metrics = {k: v for k, v in self.last.items() if k in wanted}
        self.writer.add_hparams(self.params, metrics or {"hparam/finished": 0.0}, run_name=".")
        self.writer.close()


class MLflowSink:
    """One MLflow run per metacli run: params, metrics by iteration, the final status."""

    def __init__(self, cfg: DictConfig, root: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = cfg.logger.get("tracking_uri") or f"file:{root.parent / 'mlruns'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.logger.get("experiment") or "metacli")
        self.run = mlflow.start_run(run_name=root.name, tags={"metacli.run_dir": str(root)})
        params = flat_params(cfg)
        mlflow.log_params(
            {k: str(v)[:500] for k, v in params.items() if not k.startswith("logger")}
        )

    def log(self, record: dict[str, Any]) -> None:
        values = {k.replace("/", "_"): v for k, v in scalars(record).items()}
        self.mlflow.log_metrics(values, step=int(record.get("iteration", 0)))

    def close(self, status: str) -> None:
        state = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.mlflow.end_run(status=state)


def make_sinks(cfg: DictConfig, root: Path) -> list[Sink]:
    name = cfg.logger.name
    if name == "none":
        return []
    if name not in ("tensorboard", "mlflow"):
        raise ConfigError(
            f"logger.name={name!r} is not a logging backend; choose logger=none, "
            f"logger=tensorboard or logger=mlflow."
        )
    require_extra(name, f"logger={name}")
    return [TensorBoardSink(cfg, root) if name == "tensorboard" else MLflowSink(cfg, root)]
