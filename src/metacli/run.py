"""What `metacli train` and `metacli test` do inside their run folder."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metacli import __version__
from metacli.checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from metacli.console import print_summary
from metacli.errors import ConfigError, MetacliError

if TYPE_CHECKING:
    from metacli.build import Components
    from metacli.loop import EvalSummary, LoopState

log = logging.getLogger("metacli")
GROUPS = ("algo", "task", "model", "device", "optim", "experiment", "debug")


def git_commit() -> dict[str, Any]:
    """The commit of the metacli source in use (editable installs), if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return {"git_commit": commit, "git_dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


class RunFolder:
    """A run's folder: metrics.jsonl, summary.json and checkpoints/, each written safely."""

    def __init__(self, root: Path, overrides: list[str]) -> None:
        self.root = root
        self.overrides = overrides
        self.checkpoints = root / "checkpoints"
        self.metrics_path = root / "metrics.jsonl"
        self.summary_path = root / "summary.json"
        self.summary: dict[str, Any] = {}

    @classmethod
    def current(cls) -> RunFolder:
        hydra = HydraConfig.get()
        return cls(Path(hydra.runtime.output_dir), list(hydra.overrides.task))

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def rewind_metrics(self, iteration: int) -> None:
        """On resume: drop lines written after the checkpoint, and the old meta-test line."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if record.get("iteration", 0) <= iteration and record.get("split") != "test":
                kept.append(line + "\n")
        text = "".join(kept)
        atomic_write(self.metrics_path, lambda handle: handle.write(text.encode()))

    def save_checkpoint(self, name: str, c: Components, state: LoopState) -> None:
        from metacli.loop import make_checkpoint

        save_checkpoint(self.checkpoints / f"{name}.pt", make_checkpoint(c, state, self.overrides))

    def update_summary(self, **fields: Any) -> None:
        self.summary.update(fields)
        write_json(self.summary_path, self.summary)

    def start(self, command: str, cfg: DictConfig) -> None:
        import torch

        choices = HydraConfig.get().runtime.choices
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.summary = {
            "status": "running",
            "command": command,
            "run_dir": str(self.root),
            "groups": {g: choices.get(g) for g in GROUPS},
            "overrides": self.overrides,
            "seed": cfg.get("seed"),
            "device": None,
            "torch_version": str(torch.__version__),
            "metacli_version": __version__,
            "python_version": platform.python_version(),
            **git_commit(),
            "host": platform.node(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        self.update_summary()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Record how the run ended in summary.json; a user error is one paragraph, exit 2."""
        from metacli.loop import Interrupted

        try:
            yield
        except Interrupted as err:
            log.warning(str(err))
            self.finish("interrupted", error=str(err))
            raise SystemExit(130) from None
        except MetacliError as err:
            log.error(str(err))
            self.finish("failed", error=str(err))
            raise SystemExit(2) from None
        except Exception as err:
            self.finish("failed", error=f"{type(err).__name__}: {err}")
            raise

    def finish(self, status: str, **fields: Any) -> None:
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.update_summary(status=status, finished_at=now, **fields)


def report(
    title: str, result: EvalSummary, seconds: float, folder: RunFolder, extra: list[tuple[str, str]]
) -> None:
    steps = len(result.metric_mean) - 1
    rows = [
        ("before adaptation (0 steps)", result.metric_mean[0], result.metric_ci95[0]),
        (f"after {steps} inner step{'s' * (steps != 1)}", result.final, result.metric_ci95[-1]),
    ]
    print_summary(
        f"{title}: {result.num_tasks} tasks",
        result.metric_name,
        rows,
        [*extra, ("time", f"{seconds:.1f} s"), ("run folder", str(folder.root))],
    )


def meta_test(c: Components, folder: RunFolder, iteration: int) -> EvalSummary:
    from metacli.loop import evaluate

    result = evaluate(c, "test", c.run.test.num_tasks, c.run.test.batch_size)
    folder.log_metrics(result.record(iteration, "test"))
    log.info(
        "meta-test on %d tasks: %s %.4f ± %.4f after %d steps (%.4f before adaptation)",
        result.num_tasks,
        result.metric_name,
        result.final,
        result.metric_ci95[-1],
        len(result.metric_mean) - 1,
        result.metric_mean[0],
    )
    return result


def train(cfg: DictConfig) -> float | None:
    """Meta-train, then meta-test; returns the best validation metric (for sweepers)."""
    from metacli.build import build
    from metacli.loop import LoopState, load_weights, meta_train, restore

    start = time.perf_counter()
    folder = RunFolder.current()
    folder.start("train", cfg)
    with folder.guard():
        c = build(cfg)
        folder.update_summary(device=str(c.device))
        state = LoopState()
        if cfg.resume:
            last = folder.checkpoints / "last.pt"
            state = restore(c, load_checkpoint(last), str(last))
            folder.rewind_metrics(state.iteration)
            folder.update_summary(resumed_from_iteration=state.iteration)
            log.info("Resuming %s from iteration %d", folder.root, state.iteration)
        log.info(
            "Meta-training %s on %s with %s (%d meta-parameters) on %s for %d iterations",
            cfg.algo.name,
            cfg.task.name,
            cfg.model.name,
            sum(p.numel() for p in c.algorithm.parameters()),
            c.device,
            cfg.train.iterations,
        )
        state = meta_train(c, folder, state)
        if not (folder.checkpoints / "last.pt").exists():
            folder.save_checkpoint("last", c, state)
        source = c.run.test.checkpoint
        best = folder.checkpoints / "best.pt"
        if source == "best" and best.exists():
            load_weights(c, load_checkpoint(best), str(best))
        result = meta_test(c, folder, state.iteration)
        seconds = time.perf_counter() - start
        folder.finish(
            "finished",
            iterations=state.iteration,
            train_time_s=state.wall_time,
            it_per_s=state.iteration / state.wall_time if state.wall_time else None,
            wall_time_s=seconds,
            best_val={"metric": state.best_metric, "iteration": state.best_iteration},
            test={
                **result.as_dict(),
                "checkpoint": source if best.exists() else "last",
                "checkpoint_iteration": state.best_iteration
                if source == "best" and best.exists()
                else state.iteration,
            },
        )
        report(
            "meta-test",
            result,
            seconds,
            folder,
            [("algorithm", f"{cfg.algo.name} on {cfg.task.name} ({cfg.model.name})")],
        )
    return state.best_metric


def test(cfg: DictConfig) -> float:
    """Meta-test a checkpoint on the fixed test tasks, in a run folder of its own."""
    from metacli.build import build
    from metacli.loop import load_weights

    start = time.perf_counter()
    folder = RunFolder.current()
    folder.start("test", cfg)
    with folder.guard():
        if not cfg.ckpt_path:
            raise ConfigError(
                "metacli test needs a checkpoint: add ckpt_path=<run folder>/"
                "checkpoints/best.pt (or last.pt)."
            )
        c = build(cfg)
        folder.update_summary(device=str(c.device), checkpoint=str(cfg.ckpt_path))
        checkpoint = load_checkpoint(cfg.ckpt_path)
        load_weights(c, checkpoint, str(cfg.ckpt_path))
        result = meta_test(c, folder, checkpoint["iteration"])
        seconds = time.perf_counter() - start
        folder.finish(
            "finished",
            iterations=checkpoint["iteration"],
            wall_time_s=seconds,
            test={
                **result.as_dict(),
                "checkpoint": str(cfg.ckpt_path),
                "checkpoint_iteration": checkpoint["iteration"],
            },
        )
        report(
            "meta-test",
            result,
            seconds,
            folder,
            [("checkpoint", f"{cfg.ckpt_path} (iteration {checkpoint['iteration']})")],
        )
    return result.final


COMMANDS = {"train": train, "test": test}
