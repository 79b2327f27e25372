"""Logging backends besides metrics.jsonl (which is always written): TensorBoard, MLflow,
Weights & Biases.

A sink gets every metrics.jsonl record as it is written and is closed with the run's
final status. Records carry ``iteration`` and ``split`` (train, val, test); each other
number becomes a scalar ``<split>/<key>``.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from metacli.config import WANDB_MODES, flatten
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


def wandb_mode(cfg: DictConfig) -> str:
    """logger.mode, else $WANDB_MODE, else offline: nothing reaches the network unless asked."""
    mode = cfg.logger.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    if mode not in WANDB_MODES:
        raise ConfigError(
            f"WANDB_MODE={mode!r} in the environment is not a W&B mode; set logger.mode "
            f"to one of {', '.join(WANDB_MODES)} (offline, the default, writes <run>/wandb/ "
            f"for `wandb sync` later), or unset WANDB_MODE."
        )
    return str(mode)


def wandb_run_id(root: Path) -> str:
    """The W&B run id of this metacli run: made by its first session, kept in
    ``<run>/wandb/run-id`` so that a resumed run goes on logging into the same W&B run."""
    kept = root / "wandb" / "run-id"
    if kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    kept.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]
    kept.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """The W&B run of a metacli run, written into its folder (``<run>/wandb/``): the
    config, every metric and named term by iteration, the run's name and tags and its
    final status; offline unless logger.mode=online. Every session of a resumed run logs
    into the same W&B run."""

    def __init__(self, cfg: DictConfig, root: Path) -> None:
        import wandb

        mode = wandb_mode(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)
        try:
            self.run = wandb.init(
                mode=mode,  # type: ignore[arg-type]
                dir=str(root),
                id=wandb_run_id(root),
                resume="allow",
                project=cfg.logger.project,
                entity=cfg.logger.get("entity"),
                group=cfg.logger.get("group"),
                name=cfg.get("name") or f"{root.parent.name}/{root.name}",
                tags=[str(tag) for tag in cfg.get("tags") or []],
                config={str(k): v for k, v in config.items()},
                settings=wandb.Settings(console="off", quiet=True, silent=True),
            )
        except Exception as err:  # no login, no network, a server refusing: one paragraph
            raise ConfigError(
                f"logger=wandb could not start a W&B run in mode {mode}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. Log in "
                f"(wandb login, or WANDB_API_KEY) for logger.mode=online, or keep "
                f"logger.mode=offline (the default) and run `wandb sync {root}/wandb/"
                f"offline-run-*` later."
            ) from None
        self.run.summary["metacli/run_dir"] = str(root)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record.get("iteration", 0)))

    def close(self, status: str) -> None:
        self.run.summary["metacli/status"] = status
        self.run.finish(exit_code=0 if status == "finished" else 1)


SINKS: dict[str, type[TensorBoardSink] | type[MLflowSink] | type[WandbSink]] = {
    "tensorboard": TensorBoardSink,
    "mlflow": MLflowSink,
    "wandb": WandbSink,
}


def make_sinks(cfg: DictConfig, root: Path) -> list[Sink]:
    name = cfg.logger.name
    if name == "none":
        return []
    if name not in SINKS:
        raise ConfigError(
            f"logger.name={name!r} is not a logging backend; choose logger=none, "
            f"{', '.join(f'logger={n}' for n in SINKS)}."
        )
    require_extra(name, f"logger={name}")
    return [SINKS[name](cfg, root)]
