"""The end of a sweep: one table of which jobs finished and which failed.

A Hydra callback, so it runs in the process that launched the sweep whatever the
launcher (in process, joblib workers, Slurm jobs): it reads each job's summary.json.
A sweep with a failed job exits with status 1 after the table.
"""

from __future__ import annotations

import datetime as dt
import math
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from metacli.comparison import process_alive
from metacli.composition import sweep_values
from metacli.console import CONSOLE
from metacli.files import read_json


def job_folders(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep (each holds a summary.json, or .hydra/), in job order."""
    folders = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    folders += [p.parent for p in sweep_dir.glob("**/summary.json")]
    folders = [
        f
        for f in folders
        if f != sweep_dir
        and not any(part.startswith(".") for part in f.relative_to(sweep_dir).parts)
    ]

    def order(folder: Path) -> tuple[int, str]:
        name = folder.relative_to(sweep_dir).as_posix()
        return (int(name), name) if name.isdigit() else (1 << 30, name)

    return sorted(set(folders), key=order)


def objective_text(summary: dict[str, Any]) -> str:
    value = summary.get("objective")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.4f}"


class SweepSummary(Callback):
    """Prints the sweep table after a multirun; exit status 1 when a job failed."""

    def __init__(self) -> None:
        self.started = dt.datetime.now().astimezone()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = dt.datetime.now().astimezone().replace(microsecond=0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if print_table(Path(config.hydra.sweep.dir), self.started):
            raise SystemExit(1)


def skipped(summary: dict[str, Any], started: dt.datetime) -> bool:
    """Finished before this sweep started: skip_finished left it alone."""
    try:
        finished = dt.datetime.fromisoformat(str(summary.get("finished_at")))
    except ValueError:
        return False
    return finished < started


def print_table(sweep_dir: Path, started: dt.datetime, total: int | None = None) -> int:
    """The table of the sweep's jobs (``total``: how many it has, where some never
    started); returns how many did not finish."""
    rows, failed = [], 0
    folders = job_folders(sweep_dir)
    summaries = [read_json(folder / "summary.json") or {} for folder in folders]
    every = [set(s.get("overrides") or []) for s in summaries]
    common = set.intersection(*every) if every else set()
    for folder, summary in zip(folders, summaries, strict=True):
        status = str(summary.get("status", "no summary"))
        if status == "running" and process_alive(summary) is False:
            status = "crashed"  # killed (kill -9, out of memory) before it could say so
        if status == "finished" and skipped(summary, started):
            status = "skipped (finished before)"
        note = str(summary.get("error") or "").splitlines()[0:1]
        if status not in ("finished", "skipped (finished before)"):
            failed += 1
        overrides = " ".join(o for o in summary.get("overrides") or [] if o not in common)
        rows.append((folder.name, overrides, status, objective_text(summary), note))
    unstarted = max(0, (total or 0) - len(rows))
    title = f"sweep: {len(rows) + unstarted} jobs, {failed + unstarted} not finished"
    table = Table(title=title, title_justify="left")
    for column in ("job", "overrides", "status", "objective"):
        table.add_column(column, justify="right" if column == "objective" else "left")
    for job, overrides, status, value, _ in rows:
        style = None if status.startswith(("finished", "skipped")) else "red"
        table.add_row(job, overrides, status, value, style=style)
    CONSOLE.print(table)
    if common:
        shared = " ".join(o for o in summaries[0].get("overrides") or [] if o in common)
        CONSOLE.print(f"every job: {shared}", overflow="ignore", crop=False, soft_wrap=True)
    for job, _, status, _, note in rows:
        if not status.startswith(("finished", "skipped")):
            reason = f": {note[0]}" if note else ""
            CONSOLE.print(
                f"job {job} {status}{reason} (folder {sweep_dir / job})",
                overflow="ignore",
                crop=False,
                soft_wrap=True,
            )
    if unstarted:
        CONSOLE.print(f"{unstarted} of the sweep's jobs never started")
    CONSOLE.print(f"sweep folder: {sweep_dir}", overflow="ignore", crop=False, soft_wrap=True)
    return failed + unstarted


def interrupted(sweep_dir: Path, command: str) -> None:
    """A sweep stopped by a signal: its table, with the jobs that never started, and the
    one command that continues it (finished jobs skipped, the interrupted one resumed)."""
    recorded = OmegaConf.load(sweep_dir / "multirun.yaml")
    overrides = recorded.hydra.overrides
    task = [str(o) for o in overrides.task if not str(o).startswith("skip_finished=")]
    own = [
        str(o)
        for o in overrides.hydra
        if not str(o).startswith(("hydra.mode=", "hydra.sweep.dir="))
    ]
    values = sweep_values(["-m", *task]) if task else None
    total = math.prod(len(v) for v in values) if values else None
    started = dt.datetime.fromtimestamp((sweep_dir / "multirun.yaml").stat().st_mtime).astimezone()
    print_table(sweep_dir, started, total)
    again = [*task, *own, f"hydra.sweep.dir={sweep_dir}", "skip_finished=true"]
    CONSOLE.print(
        f"Continue the sweep with: metacli {command} -m {shlex.join(again)}",
        overflow="ignore",
        crop=False,
        soft_wrap=True,
    )
