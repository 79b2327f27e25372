"""A run's folder: its one writer, its files written whole or not at all, its summary, and
how a run that stops is recorded.

Nothing is written before ``start``: a command that stops earlier (a config error, a
refused resume, a folder in use) leaves an existing folder as it was and removes a folder
it created. ``guard`` records how the run ended: finished, failed (with the message, and
the traceback of an unexpected error) or interrupted (with the ``resume=`` command).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metacli import __version__, distributed
from metacli.checkpoint import LoopState, load_checkpoint, resumable, save_checkpoint
from metacli.console import open_run_logs
from metacli.errors import MetacliError, out_of_memory
from metacli.evaluation import TASKS_HEADER
from metacli.files import read_json, write_json, write_text
from metacli.lock import FolderLock
from metacli.signals import STOPPER, Interrupted, exit_code

log = logging.getLogger("metacli")
GROUPS = ("algo", "update", "task", "model", "device", "optim", "logger", "experiment", "debug")
# Keys that say where or how a run executes, not what it computes.
RUN_ONLY_KEYS = ("resume", "ckpt_path", "skip_finished", "threads", "logger", "name", "tags")
TEST_KEYS = ("test", "test_last", "test_ensemble")  # a meta-test's results in the summary
RUN_FILES = ("summary.json", "metrics.jsonl", "tasks.csv", "checkpoints")


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
        hydra: Any = None,
        raises: bool = False,
    ) -> None:
        self.root = root
        self.cfg = cfg  # as Hydra composed it (.hydra/config.yaml)
        self.hydra = hydra  # Hydra's own node (choices, overrides; .hydra/hydra.yaml)
        self.overrides = overrides
        self.multirun = multirun  # a failed job is recorded, not raised: the sweep goes on
        # True (the Python API): an error reaches the caller as itself, never an exit code
        self.raises = raises
        self.command = command
        self.sinks: list[Any] = []  # extra logging backends (metacli.loggers)
        self.checkpoints = root / "checkpoints"
        self.metrics_path = root / "metrics.jsonl"
        self.tasks_path = root / "tasks.csv"
        self.summary_path = root / "summary.json"
        self.summary: dict[str, Any] = {}
        self.started = False
        # wall time: this session's, from here, plus the earlier sessions' of a resumed run
        self.began = time.perf_counter()
        self.earlier_wall_time = 0.0
        self.earlier_eval_time = 0.0  # what the restored checkpoint's eval_time misses
        self.segment = 1
        # the meta-tests of the finished sessions this one extends, kept in the summary
        self.earlier_tests: list[dict[str, Any]] = []
        self.existed = root.exists() and any(
            p.name != ".lock" for p in root.iterdir()
        )  # before this command: never removed
        self.lock = FolderLock(root / ".lock", f"metacli {command} {' '.join(overrides)}")
        # In a distributed run rank 0 alone writes; the other ranks compute the same steps
        # with every write skipped (metacli.distributed).
        self.writer = distributed.WORLD.writer

    @classmethod
    def current(cls, command: str, cfg: DictConfig) -> RunFolder:
        """The folder of the Hydra job this process runs."""
        hydra = HydraConfig.get()
        multirun = hydra.mode == RunMode.MULTIRUN
        root = Path(hydra.runtime.output_dir)
        # the user's config folders go with the overrides, so test and resume replay them
        folders = [o for o in hydra.overrides.hydra if o.startswith("hydra.searchpath=")]
        overrides = [*hydra.overrides.task, *folders]
        return cls(root, overrides, multirun, command, cfg, hydra)

    # --- writing, each write either complete or not at all ---------------------------
    def write(self, path: Path, action: Callable[[], object]) -> None:
        if not self.writer:
            return
        existed = path.exists()
        try:
            action()
        except OSError as err:
            before = "Its previous content is intact" if existed else "It was not created"
            raise WriteError(
                f"Cannot write {path}: {err.strerror or err}. {before}. Free disk space or "
                f"fix the permissions of {path.parent}; {self.continuation()}."
            ) from None

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.write(self.metrics_path, lambda: append_line(self.metrics_path, json.dumps(record)))
        for sink in self.sinks:
            sink.log(record)

    def log_tasks(self, lines: Iterable[str]) -> None:
        """Rows of tasks.csv (an evaluation's, appended whole or not at all)."""
        new = not self.tasks_path.exists() or self.tasks_path.stat().st_size == 0
        rows = itertools.chain([TASKS_HEADER], lines) if new else lines
        self.write(self.tasks_path, lambda: append_lines(self.tasks_path, rows))

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

    def previous_run(self, skip_finished: bool, config: dict[str, Any]) -> str | None:
        """What an earlier run in this folder means for this one (re-run sweeps).

        ``finished`` (same config, finished: skip it) or ``resumable`` (same config,
        unfinished, with a checkpoint) when ``skip_finished`` is on; ``replace`` when the
        earlier run's files are to be moved aside (``archive``); None for a new folder.
        ``config``: this run's (``config_of`` its effective config). In a distributed run
        rank 0 decides for all.
        """
        decided = self._previous_run(skip_finished, config) if self.writer else None
        return distributed.broadcast(decided)

    def _previous_run(self, skip_finished: bool, config: dict[str, Any]) -> str | None:
        old = read_json(self.summary_path)
        if old is None and not self.metrics_path.exists():
            return None
        if skip_finished and old is not None and old.get("config") == config:
            if old.get("status") == "finished":
                return "finished"
            if resumable(self.root) is not None:
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
        """On resume: drop the lines of metrics.jsonl and the rows of tasks.csv written
        after the checkpoint, and the old meta-test's."""
        if not self.writer:
            return

        tested = [t.get("iteration") for t in self.earlier_tests]
        last_tested = max((t for t in tested if isinstance(t, int)), default=-1)

        def kept(split: Any, at: Any) -> bool:
            """Up to the checkpoint; a meta-test only where it ended a finished session."""
            return int(at or 0) <= iteration and (
                not str(split).startswith("test") or int(at or 0) <= last_tested
            )

        if self.metrics_path.exists():
            lines = []
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if kept(record.get("split"), record.get("iteration")):
                    lines.append(line + "\n")
            text = "".join(lines)
            self.write(self.metrics_path, lambda: write_text(self.metrics_path, text))
        if self.tasks_path.exists():
            header, *rows = self.tasks_path.read_text(encoding="utf-8").splitlines()
            split_at = [row.split(",", 2) for row in rows]
            rows = [r for r, f in zip(rows, split_at, strict=True) if len(f) == 3 and kept(*f[:2])]
            table = "".join(line + "\n" for line in [header, *rows])
            self.write(self.tasks_path, lambda: write_text(self.tasks_path, table))

    def write_config_files(self) -> None:
        """``.hydra/``: the composed config, the overrides and Hydra's own settings."""
        hydra = self.hydra
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
        choices = self.hydra.runtime.choices if self.hydra is not None else {}
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
            "name": effective.get("name"),
            "tags": list(effective.get("tags") or []),
            "seed": effective.get("seed"),
            "torch_version": str(torch.__version__),
            "metacli_version": __version__,
            "python_version": platform.python_version(),
            **git_commit(),
            "host": platform.node(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **({"earlier_tests": self.earlier_tests} if self.earlier_tests else {}),
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
        # The folder, its date folder, and, below the working directory, the empty folders
        # above them (outputs/test/ of a first `metacli test` that failed): only if empty
        here = Path.cwd().resolve()
        root = self.root.resolve()
        chain = [root, root.parent]
        if here in root.parents:
            chain = [p for p in (root, *root.parents) if here in p.parents]
        for folder in chain:
            try:
                folder.rmdir()  # only if empty: nothing else is ever removed
            except OSError:
                break

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Record how the run ended; a user error is one paragraph and exit 2, a signal
        exit 130 (SIGINT) or 143 (SIGTERM).

        In a sweep a failed job is recorded and swallowed (the sweep goes on and its
        summary lists it); a signal still stops the whole sweep. With ``raises`` (the
        Python API) the error itself reaches the caller, recorded the same way.
        """
        try:
            yield
        except (Interrupted, KeyboardInterrupt) as err:
            STOPPER.stopping = True  # further signals wait until the outcome is recorded
            signum = int(getattr(err, "signum", signal.SIGINT))
            phase = str(getattr(err, "phase", STOPPER.phase))
            message = str(err) if isinstance(err, Interrupted) else self.stopped_now(signum, phase)
            log.warning(message)
            self.end("interrupted", error=message)
            if self.raises:
                raise
            raise SystemExit(exit_code(signum)) from None
        except MetacliError as err:
            STOPPER.stopping = True
            log.error(str(err))
            self.end("failed", error=str(err))
            if self.raises:
                raise
            if not self.multirun:
                raise SystemExit(2) from None
        except Exception as err:
            STOPPER.stopping = True
            if out_of_memory(err):  # more than the estimate before the run (docs/memory.md)
                message = (
                    f"Ran out of memory during {getattr(err, 'phase', STOPPER.phase)}: "
                    f"{str(err).splitlines()[0]} "
                    f"Lower train.meta_batch_size, val.batch_size and test.batch_size, or "
                    f"the model's size; {self.continuation()}."
                )
                log.error(message)
                self.end("failed", error=message)
                if self.raises:
                    raise MetacliError(message) from None
                if not self.multirun:
                    raise SystemExit(2) from None
                return
            message = f"{type(err).__name__}: {err}"
            self.end("failed", error=message, traceback=traceback.format_exc())
            if not self.multirun:
                raise
            log.error("%s (the traceback is in %s)", message, self.summary_path)
        finally:
            self.lock.release()

    def stopped_now(self, signum: int, where: str) -> str:
        return f"Stopped by {signal.Signals(signum).name} during {where}; {self.continuation()}."

    def continuation(self) -> str:
        """How to go on from what the folder holds, said only of checkpoints that exist."""
        checkpoint = resumable(self.root) if self.command == "train" else None
        if checkpoint is None or (kept := read_checkpoint_iteration(checkpoint)) is None:
            return "no checkpoint was written yet: run the command again"
        return (
            f"checkpoints/{checkpoint.name} holds iteration {kept}. Continue with: "
            f"metacli train resume={self.root}"
        )

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

    def resumes(self, earlier: dict[str, Any], state: LoopState) -> None:
        """This session continues a run whose previous summary is ``earlier`` and whose
        checkpoint held ``state``: its times, the least the earlier sessions took (a killed
        session recorded none), count towards this session's."""

        def recorded(key: str) -> float:
            value = earlier.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
            return 0.0

        self.earlier_wall_time = max(recorded("wall_time_s"), state.wall_time)
        # validations the checkpoint counts, and the earlier sessions' meta-tests
        self.earlier_eval_time = max(recorded("eval_time_s"), state.eval_time) - state.eval_time
        segments = earlier.get("segments")
        self.segment = (segments if isinstance(segments, int) and segments > 0 else 1) + 1
        history = earlier.get("earlier_tests")
        self.earlier_tests = (
            [t for t in history if isinstance(t, dict)] if isinstance(history, list) else []
        )
        if earlier.get("status") == "finished" and isinstance(earlier.get("test"), dict):
            # extending a finished run: its meta-test stays recorded, never overwritten
            self.earlier_tests.append(
                {
                    "iteration": earlier.get("iterations"),
                    "finished_at": earlier.get("finished_at"),
                    **{k: earlier[k] for k in TEST_KEYS if k in earlier},
                }
            )

    def finish(self, status: str, **fields: Any) -> None:
        """Record how the run ended, with its wall time over every session (``segments``)."""
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        fields.setdefault("wall_time_s", self.earlier_wall_time + time.perf_counter() - self.began)
        fields.setdefault("segments", self.segment)
        for sink in self.sinks:
            sink.close(status)
        self.sinks = []
        try:
            self.update_summary(status=status, finished_at=now, **fields)
        except WriteError as err:  # the run stops anyway; say that its status is stale
            log.error("Could not record status %s: %s", status, err)


def append_line(path: Path, line: str) -> None:
    """One line appended whole, or the file left as it was (a failed write is cut off)."""
    append_lines(path, [line])


def append_lines(path: Path, lines: Iterable[str], chunk: int = 65536) -> None:
    """Lines appended whole, or the file left as it was (a failed write is cut off);
    written ``chunk`` lines at a time, so that millions of rows never sit in memory
    at once. Nothing is written where there are no lines."""
    iterator = iter(lines)
    batches = iter(lambda: list(itertools.islice(iterator, chunk)), [])
    first = next(batches, None)
    if first is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            for batch in itertools.chain([first], batches):
                view = memoryview(("\n".join(batch) + "\n").encode())
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
