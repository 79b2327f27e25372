"""What `metacli train` and `metacli test` do inside their run folder."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metacli import __version__, distributed
from metacli.checkpoint import (
    LoopState,
    load_checkpoint,
    load_weights,
    make,
    restore,
    save_checkpoint,
)
from metacli.console import open_run_logs, print_summary
from metacli.errors import ConfigError, MetacliError
from metacli.files import read_json, write_json, write_text
from metacli.lock import FolderLock
from metacli.signals import STOPPER, exit_code

if TYPE_CHECKING:
    from metacli.build import Components
    from metacli.loop import EvalSummary

log = logging.getLogger("metacli")
GROUPS = ("algo", "update", "task", "model", "device", "optim", "logger", "experiment", "debug")
# Keys that say where or how a run executes, not what it computes.
RUN_ONLY_KEYS = ("resume", "ckpt_path", "skip_finished", "threads", "logger")
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoints")


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


class WriteError(MetacliError):
    """A run file could not be written (full disk, permissions); the old one is intact."""


class RunFolder:
    """A run's folder: metrics.jsonl, summary.json and checkpoints/, each written safely.

    One process writes a folder at a time (``claim``). Nothing is written before
    ``start``: a command that stops earlier (a config error, a refused resume, a folder in
    use) leaves an existing folder as it was and removes a folder it created.
    """

    def __init__(
        self,
        root: Path,
        overrides: list[str],
        multirun: bool = False,
        command: str = "train",
        cfg: DictConfig | None = None,
    ) -> None:
        self.root = root
        self.cfg = cfg  # as Hydra composed it (.hydra/config.yaml)
        self.overrides = overrides
        self.multirun = multirun  # a failed job is recorded, not raised: the sweep goes on
        self.command = command
        self.sinks: list[Any] = []  # extra logging backends (metacli.loggers)
        self.checkpoints = root / "checkpoints"
        self.metrics_path = root / "metrics.jsonl"
        self.summary_path = root / "summary.json"
        self.summary: dict[str, Any] = {}
        self.started = False
        self.existed = root.exists() and any(
            p.name != ".lock" for p in root.iterdir()
        )  # before this command: never removed
        self.lock = FolderLock(root / ".lock", f"metacli {command} {' '.join(overrides)}")
        # In a distributed run rank 0 alone writes; the other ranks compute the same steps
        # with every write skipped (metacli.distributed).
        self.writer = distributed.WORLD.writer

    @classmethod
    def current(cls, command: str, cfg: DictConfig) -> RunFolder:
        hydra = HydraConfig.get()
        multirun = hydra.mode == RunMode.MULTIRUN
        root = Path(hydra.runtime.output_dir)
        return cls(root, list(hydra.overrides.task), multirun, command, cfg)

    # --- writing, each write either complete or not at all ---------------------------
    def write(self, path: Path, action: Callable[[], object]) -> None:
        if not self.writer:
            return
        try:
            action()
        except OSError as err:
            raise WriteError(
                f"Cannot write {path}: {err.strerror or err}. Its previous content is "
                f"intact. Free disk space or fix the permissions of {path.parent}, then "
                f"continue with: metacli train resume={self.root}"
            ) from None

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.write(self.metrics_path, lambda: append_line(self.metrics_path, json.dumps(record)))
        for sink in self.sinks:
            sink.log(record)

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        path = self.checkpoints / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)  # top/ (test.ensemble_top_k)
        self.write(path, lambda: save_checkpoint(path, checkpoint))

    def remove_checkpoint(self, name: str) -> None:
        path = self.checkpoints / f"{name}.pt"
        self.write(path, lambda: path.unlink(missing_ok=True))

    def write_text(self, name: str, text: str | bytes) -> None:
        self.write(self.root / name, lambda: write_text(self.root / name, text))

    def update_summary(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.write(self.summary_path, lambda: write_json(self.summary_path, self.summary))

    # --- the folder's life ------------------------------------------------------------
    def claim(self) -> None:
        """Become the folder's one writer, or stop naming the live one."""
        if self.writer:
            self.lock.acquire()

    def previous_run(self, cfg: DictConfig) -> str | None:
        """What an earlier run in this folder means for this one (re-run sweeps).

        ``finished`` (same config, finished: skip it) or ``resumable`` (same config,
        unfinished, with a checkpoint) when ``skip_finished`` is on; ``replace`` when the
        earlier run's files are to be moved aside (``archive``); None for a new folder.
        In a distributed run rank 0 decides for all.
        """
        return distributed.broadcast(self._previous_run(cfg) if self.writer else None)

    def _previous_run(self, cfg: DictConfig) -> str | None:
        old = read_json(self.summary_path)
        if old is None and not self.metrics_path.exists():
            return None
        if cfg.get("skip_finished") and old is not None and old.get("config") == effective_of(cfg):
            if old.get("status") == "finished":
                return "finished"
            if (self.checkpoints / "last.pt").exists():
                return "resumable"
        return "replace"

    def archive(self) -> None:
        """Move an earlier run's files to ``.replaced/<time>/``, never overwrite them."""
        if not self.writer:
            return
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        archive = self.root / ".replaced" / stamp
        archive.mkdir(parents=True)
        for name in RUN_FILES:
            if (self.root / name).exists():
                shutil.move(str(self.root / name), str(archive / name))
        log.info("An earlier run in %s was moved to %s", self.root, archive)

    def rewind_metrics(self, iteration: int) -> None:
        """On resume: drop lines written after the checkpoint, and the old meta-test line."""
        if not self.writer or not self.metrics_path.exists():
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
        self.write(self.metrics_path, lambda: write_text(self.metrics_path, text))

    def write_config_files(self) -> None:
        """``.hydra/``: the composed config, the overrides and Hydra's own settings."""
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        files = {"overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(self.overrides)))}
        if self.cfg is not None:
            files["config.yaml"] = OmegaConf.to_yaml(self.cfg)
        if hydra is not None:
            files["hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra}))
        for name, text in files.items():
            path = self.root / ".hydra" / name
            self.write(path, functools.partial(write_text, path, text))

    def start(self, effective: DictConfig, **fields: Any) -> None:
        """The checks have passed: write the config files and summary, open the log."""
        import torch

        self.started = True
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        choices = hydra.runtime.choices if hydra is not None else {}
        self.write(self.checkpoints, lambda: self.checkpoints.mkdir(parents=True, exist_ok=True))
        self.write_config_files()
        if self.writer:
            open_run_logs(str(self.root))
        self.summary = {
            "status": "running",
            "command": self.command,
            "run_dir": str(self.root),
            "groups": {g: choices.get(g) for g in GROUPS},
            "overrides": self.overrides,
            "config": config_of(effective),
            "seed": effective.get("seed"),
            "torch_version": str(torch.__version__),
            "metacli_version": __version__,
            "python_version": platform.python_version(),
            **git_commit(),
            "host": platform.node(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **fields,
        }
        self.update_summary()
        log.info("Run folder: %s", self.root)
        log.info("Overrides: %s", " ".join(self.overrides) or "(none: the defaults)")

    def discard(self) -> None:
        """Stopped before ``start``: remove the folder if this command created it."""
        if not self.writer:
            return
        created_lock = not self.existed
        self.lock.release()
        if self.existed or self.multirun:
            return
        if created_lock:
            (self.root / ".lock").unlink(missing_ok=True)
        for folder in (self.root, self.root.parent):
            try:
                folder.rmdir()  # only if empty: nothing else is ever removed
            except OSError:
                break

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Record how the run ended; a user error is one paragraph and exit 2, a signal
        exit 130 (SIGINT) or 143 (SIGTERM).

        In a sweep a failed job is recorded and swallowed (the sweep goes on and its
        summary lists it); a signal still stops the whole sweep.
        """
        from metacli.loop import Interrupted

        try:
            yield
        except (Interrupted, KeyboardInterrupt) as err:
            STOPPER.stopping = True  # further signals wait until the outcome is recorded
            signum = int(getattr(err, "signum", signal.SIGINT))
            phase = str(getattr(err, "phase", STOPPER.phase))
            message = str(err) if isinstance(err, Interrupted) else self.stopped_now(signum, phase)
            log.warning(message)
            self.end("interrupted", error=message)
            raise SystemExit(exit_code(signum)) from None
        except MetacliError as err:
            STOPPER.stopping = True
            log.error(str(err))
            self.end("failed", error=str(err))
            if not self.multirun:
                raise SystemExit(2) from None
        except Exception as err:
            STOPPER.stopping = True
            message = f"{type(err).__name__}: {err}"
            self.end("failed", error=message, traceback=traceback.format_exc())
            if not self.multirun:
                raise
            log.error("%s (the traceback is in %s)", message, self.summary_path)
        finally:
            self.lock.release()

    def stopped_now(self, signum: int, where: str) -> str:
        last = self.checkpoints / "last.pt"
        kept = read_checkpoint_iteration(last)
        if kept is None:
            saved = "no checkpoint was written; start the run again"
        else:
            saved = (
                f"checkpoints/last.pt holds iteration {kept}. Continue with: "
                f"metacli train resume={self.root}"
            )
        return f"Stopped by {signal.Signals(signum).name} during {where}; {saved}."

    def end(self, status: str, **fields: Any) -> None:
        """Record the end of a started run; forget one that never started."""
        if self.started:
            self.finish(status, **fields)
        elif self.multirun and status == "failed":  # a sweep's summary lists failed jobs
            self.started = True
            self.summary = {"status": status, "command": self.command, "run_dir": str(self.root)}
            try:
                self.write_config_files()
            except WriteError as err:
                log.error("%s", err)
            open_run_logs(str(self.root))
            self.finish(status, overrides=self.overrides, **fields)
        else:
            self.discard()

    def finish(self, status: str, **fields: Any) -> None:
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        for sink in self.sinks:
            sink.close(status)
        self.sinks = []
        try:
            self.update_summary(status=status, finished_at=now, **fields)
        except WriteError as err:  # the run stops anyway; say that its status is stale
            log.error("Could not record status %s: %s", status, err)


def append_line(path: Path, line: str) -> None:
    """One line appended whole, or the file left as it was (a failed write is cut off)."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_checkpoint_iteration(path: Path) -> int | None:
    """The iteration a checkpoint holds (None if there is none)."""
    if not path.is_file():
        return None
    try:
        return int(load_checkpoint(path)["iteration"])
    except (MetacliError, KeyError, TypeError, ValueError):
        return None


def config_of(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config of a run without the keys that only say where or how it runs."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items() if k not in RUN_ONLY_KEYS}


def effective_of(cfg: DictConfig) -> dict[str, Any] | None:
    """``config_of`` the effective config (after ``configure``); None if it is invalid."""
    from metacli.build import resolve

    try:
        return config_of(resolve(cfg).effective)
    except MetacliError:
        return None


def objective(summary: dict[str, Any], which: str) -> float:
    """What a run returns to sweepers: NaN unless it finished (Optuna: a failed trial)."""
    if summary.get("status") != "finished":
        return math.nan
    test = (summary.get("test") or {}).get("mean")
    value = test if which == "test" else (summary.get("best_val") or {}).get("metric")
    value = test if value is None else value  # no validation ran
    return math.nan if value is None else float(value)


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): the time from
    the command to the first iteration, imports included, is what a user waits."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime, field 22
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def set_threads(cfg: DictConfig) -> int:
    """Torch CPU threads: ``threads``, else the cores a launcher gives each job.

    Parallel local jobs each taking every core would oversubscribe the CPU, so the cores
    are divided by joblib's n_jobs, or set from submitit's cpus_per_task / Ray's num_cpus.
    """
    import torch

    threads = cfg.get("threads")
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
        launcher = HydraConfig.get().launcher
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks sharing this machine
        ray = OmegaConf.select(launcher, "ray.remote.num_cpus", default=None)
        n_jobs = launcher.get("n_jobs")
        if launcher.get("cpus_per_task") or ray:
            threads = int(launcher.get("cpus_per_task") or ray)
        elif n_jobs:
            jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all
            threads = max(1, cores // jobs)
        elif distributed.WORLD.active and local > 1:
            threads = max(1, cores // local)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def report(
    title: str, result: EvalSummary, seconds: float, folder: RunFolder, extra: list[tuple[str, str]]
) -> None:
    if not folder.writer:  # a distributed run: rank 0 prints it
        return
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


def meta_test(c: Components, folder: RunFolder, iteration: int, split: str = "test") -> EvalSummary:
    """The fixed meta-test tasks on the weights in memory; ``split`` names the record
    (``test_last``: the last weights, besides the best ones)."""
    from metacli.loop import evaluate

    with STOPPER.during("the meta-test"):
        result = evaluate(c, "test", c.run.test.num_tasks, c.run.test.batch_size)
    folder.log_metrics(result.record(iteration, split))
    (log.warning if result.nonfinite else log.info)(
        "%s on %d tasks: %s %.4f ± %.4f after %d steps (%.4f before adaptation)%s",
        "meta-test" if split == "test" else "meta-test of the last weights",
        result.num_tasks,
        result.metric_name,
        result.final,
        result.metric_ci95[-1],
        len(result.metric_mean) - 1,
        result.metric_mean[0],
        result.describe_nonfinite(),
    )
    return result


def meta_test_ensemble(c: Components, folder: RunFolder, state: LoopState) -> dict[str, Any] | None:
    """With ``test.ensemble_top_k``: the fixed meta-test tasks on the mean prediction of
    the best validation checkpoints kept in ``checkpoints/top/`` (None when off, or with
    fewer than two kept). The weights in memory change; nothing after uses them."""
    from metacli.loop import evaluate_ensemble, top_name

    if c.run.test.ensemble_top_k < 2:
        return None
    kept = [(int(it), folder.checkpoints / f"{top_name(int(it))}.pt") for _, it in state.top]
    missing = [str(path) for _, path in kept if not path.exists()]
    if missing:
        log.warning("ensemble: %s missing; the meta-test averages the others", ", ".join(missing))
    kept = [(it, path) for it, path in kept if path.exists()]
    if len(kept) < 2:
        log.warning("ensemble: fewer than two validation checkpoints kept; no ensemble meta-test")
        return None
    weights = [load_checkpoint(path)["algorithm"] for _, path in kept]
    with STOPPER.during("the meta-test"):
        result = evaluate_ensemble(c, weights, c.run.test.num_tasks, c.run.test.batch_size)
    folder.log_metrics({**result.record(state.iteration, "test_ensemble"), "members": len(kept)})
    log.info(
        "meta-test of the mean prediction of the %d best validation checkpoints (iterations "
        "%s) on %d tasks: %s %.4f ± %.4f after %d steps",
        len(kept),
        ", ".join(str(it) for it, _ in kept),
        result.num_tasks,
        result.metric_name,
        result.final,
        result.metric_ci95[-1],
        len(result.metric_mean) - 1,
    )
    return {**result.as_dict(), "checkpoint_iterations": [it for it, _ in kept]}


def train(cfg: DictConfig) -> float:
    """Meta-train, then meta-test; returns ``optimized_metric`` (for sweepers; NaN if failed)."""
    from metacli.build import build
    from metacli.loggers import make_sinks
    from metacli.loop import meta_train

    start = time.perf_counter()
    distributed.join(cfg)
    folder = RunFolder.current("train", cfg)
    with STOPPER.installed(), folder.guard(), distributed.leaving():
        folder.claim()
        previous = None if cfg.resume else folder.previous_run(cfg)
        if previous == "finished":
            summary = read_json(folder.summary_path) or {}
            log.info("skip_finished: %s already holds a finished run of this config", folder.root)
            folder.discard()
            return objective(summary, cfg.optimized_metric)
        threads = set_threads(cfg)
        c = build(cfg, folder.overrides)
        state = LoopState()
        resuming = bool(cfg.resume) or previous == "resumable"
        if resuming:
            last = folder.checkpoints / "last.pt"
            state = restore(c, load_checkpoint(last), str(last))
        elif previous == "replace":
            folder.archive()
        folder.start(
            c.cfg,
            device=str(c.device),
            threads=threads,
            batching=c.algorithm.batching,  # what algo.batching=auto resolved to
            **distributed.described(),
        )
        if resuming:
            folder.rewind_metrics(state.iteration)
            folder.update_summary(resumed_from_iteration=state.iteration)
            log.info("Resuming %s from iteration %d", folder.root, state.iteration)
        folder.sinks = make_sinks(c.cfg, folder.root)
        log.info(
            "Meta-training %s on %s with %s (%d meta-parameters) on %s for %d iterations",
            cfg.algo.name,
            cfg.task.name,
            cfg.model.name,
            sum(p.numel() for p in c.algorithm.parameters()),
            c.device,
            cfg.train.iterations,
        )
        startup = process_age()
        state = meta_train(c, folder, state)
        distributed.barrier()  # rank 0's checkpoints are on disk: every rank reads them
        if not (folder.checkpoints / "last.pt").exists():
            folder.save_checkpoint("last", make(c, state))
        source = c.run.test.checkpoint
        best = folder.checkpoints / "best.pt"
        extra: dict[str, Any] = {}
        if c.run.test.report_last and source == "best" and best.exists():
            # the last weights are in memory: meta-test them first, then the best ones
            final = meta_test(c, folder, state.iteration, split="test_last")
            extra["test_last"] = {**final.as_dict(), "checkpoint_iteration": state.iteration}
        if source == "best" and best.exists():
            load_weights(c, load_checkpoint(best), str(best))
        result = meta_test(c, folder, state.iteration)
        ensemble = meta_test_ensemble(c, folder, state)
        if ensemble is not None:
            extra["test_ensemble"] = ensemble
        seconds = time.perf_counter() - start
        executor = c.algorithm.executor
        compiled: dict[str, Any] = {}
        if executor.compile:  # this session's compile time, apart from the iterations'
            compiled = {"compile_s": executor.compile_seconds}
            if executor.fallback is not None:
                compiled["compile_fallback"] = executor.fallback
        folder.finish(
            "finished",
            iterations=state.iteration,
            startup_s=startup,
            **compiled,
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
            **extra,
        )
        folder.update_summary(objective=objective(folder.summary, cfg.optimized_metric))
        lines = [("algorithm", f"{cfg.algo.name} on {cfg.task.name} ({cfg.model.name})")]
        if ensemble is not None:
            members = len(ensemble["checkpoint_iterations"])
            value = f"{ensemble['mean']:.4f} ± {ensemble['ci95']:.4f}"
            lines.append((f"mean of the {members} best checkpoints", value))
        report("meta-test", result, seconds, folder, lines)
    return objective(folder.summary, cfg.optimized_metric)


def test(cfg: DictConfig) -> float:
    """Meta-test a checkpoint on the fixed test tasks, in a run folder of its own."""
    from metacli.build import build

    start = time.perf_counter()
    distributed.join(cfg)
    folder = RunFolder.current("test", cfg)
    with STOPPER.installed(), folder.guard(), distributed.leaving():
        folder.claim()
        previous = folder.previous_run(cfg)
        if not cfg.ckpt_path:
            raise ConfigError(
                "metacli test needs a checkpoint: add ckpt_path=<run folder>/"
                "checkpoints/best.pt (or last.pt)."
            )
        threads = set_threads(cfg)
        c = build(cfg, folder.overrides)
        checkpoint = load_checkpoint(cfg.ckpt_path)
        load_weights(c, checkpoint, str(cfg.ckpt_path))
        if previous is not None:
            folder.archive()
        folder.start(
            c.cfg,
            device=str(c.device),
            threads=threads,
            checkpoint=str(cfg.ckpt_path),
            **distributed.described(),
        )
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
    return objective(folder.summary, "test")


COMMANDS = {"train": train, "test": test}
