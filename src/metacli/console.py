"""Terminal output: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import track as rich_track
from rich.table import Table

from metacli import distributed

T = TypeVar("T")
CONSOLE = Console()
# Periodic progress lines: always in metacli.log; on a terminal the bar shows them instead.
PROGRESS_LOGGER = "metacli.progress"
REFRESH = 30.0  # seconds between progress lines, at most (the README's promise)


def hms(seconds: float) -> str:
    """A duration as h:mm:ss (an ETA in progress lines)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _NotProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != PROGRESS_LOGGER


def make_log_handler() -> logging.Handler:
    """Console handler used by conf/hydra/job_logging/metacli.yaml."""
    handler: logging.Handler
    world = distributed.from_env()
    if not world.writer:  # a distributed run's other ranks: errors only
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {world.rank}] %(levelname)s: %(message)s"))
        handler.setLevel(logging.ERROR)
        return handler
    if CONSOLE.is_terminal:
        handler = RichHandler(console=CONSOLE, show_path=False, rich_tracebacks=False)
        handler.addFilter(_NotProgress())
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    return handler


def file_formatter() -> logging.Formatter:
    """The format of ``metacli.log`` (conf/hydra/job_logging/metacli.yaml; the Python API)."""
    return logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


class RunLogHandler(logging.Handler):
    """``metacli.log`` in the run folder, opened only once the run owns its folder.

    Until :func:`open_run_logs` is called the records wait in memory: a command that stops
    before (a config error, a folder in use, a resume that is refused) writes nothing into
    the folder, and the console has shown the records already.
    """

    live: list[RunLogHandler] = []  # this process's handlers (one per job)

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename
        self.pending: list[logging.LogRecord] = []
        self.stream: Any = None
        RunLogHandler.live.append(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            if len(self.pending) < 10_000:
                self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except OSError:  # a full disk must not turn each log call into a traceback
            pass

    def start(self) -> None:
        if self.stream is None:
            self.stream = open(self.filename, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
            for record in self.pending:
                self.emit(record)
            self.pending = []

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self in RunLogHandler.live:
            RunLogHandler.live.remove(self)
        super().close()


def open_run_logs(folder: str) -> None:
    """Start writing the log file(s) of the run in ``folder``."""
    for handler in list(RunLogHandler.live):
        if str(handler.filename).startswith(str(folder)):
            handler.start()


class Bar:
    """Updates a rich progress bar when there is one; silent otherwise."""

    def __init__(self, progress: Progress | None, total: int, start: int) -> None:
        self.progress = progress
        self.task = (
            progress.add_task("meta-train", total=total, completed=start, stats="")
            if progress
            else None
        )

    def update(self, iteration: int, **stats: Any) -> None:
        """Move the bar; ``stats`` (loss, validation metric, speed) replace the shown ones."""
        if self.progress is None or self.task is None:
            return
        if stats:
            text = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in stats.items()
                if v is not None
            )
            self.progress.update(self.task, completed=iteration, stats=text)
        else:
            self.progress.update(self.task, completed=iteration)


def track(items: Sequence[T], description: str) -> Iterator[T]:
    """Iterate with a progress bar on a terminal; log every 10% elsewhere."""
    if CONSOLE.is_terminal:
        yield from rich_track(items, description=description, console=CONSOLE)
        return
    log = logging.getLogger(PROGRESS_LOGGER)
    step, total = max(len(items) // 10, 1), len(items)
    start = last = time.perf_counter()
    for i, item in enumerate(items):
        now = time.perf_counter()
        if i % step == 0 or now - last >= REFRESH:  # every 10%, and at least every 30 s
            rate = i / (now - start) if i and now > start else None
            eta = f", {rate:.0f}/s, eta {hms((total - i) / rate)}" if rate else ""
            log.info("%s: %d/%d%s", description, i, total, eta)
            last = now
        yield item
    log.info("%s: %d/%d", description, total, total)


@contextmanager
def progress_bar(total: int, start: int) -> Iterator[Bar]:
    if not CONSOLE.is_terminal or not distributed.from_env().writer:
        yield Bar(None, total, start)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=CONSOLE, transient=False) as progress:
        yield Bar(progress, total, start)


def print_summary(
    title: str,
    metric_name: str,
    rows: list[tuple[str, float, float]],
    footer: list[tuple[str, str]],
) -> None:
    """A table of ``metric mean +- 95% CI`` rows, then key/value lines (time, run folder)."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column(f"{metric_name} (mean ± 95% CI)", justify="right")
    for label, mean, ci in rows:
        table.add_row(label, f"{mean:.4f} ± {ci:.4f}")
    CONSOLE.print(table)
    for key, value in footer:  # plain lines: a path must never be cut to fit a column
        CONSOLE.print(f"{key}: {value}", overflow="ignore", crop=False, soft_wrap=True)
