"""`metacli runs`: the runs below some folders, and removing those a filter selects.

    metacli runs [PATHS] [--filter KEY=VALUE] [--status S] [--older-than DAYS|DATE]
    metacli runs rm [PATHS] [the same filters] [--yes]

A run is a folder with a summary.json; earlier runs moved aside by a re-run sweep
(``<job>/.replaced/<time>/``) are listed with the status ``replaced``. ``rm`` shows what it
selected, asks (``--yes`` answers for scripts), and never touches a run whose folder a live
process holds (its lock).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from metacli.comparison import Run, labels, load_run, matches, number, section
from metacli.errors import MetacliError
from metacli.lock import FolderLock

STATUSES = ("finished", "failed", "interrupted", "crashed", "running", "replaced", "unreadable")


@dataclass
class Entry:
    run: Run
    archived: bool  # a run moved aside into .replaced/

    @property
    def status(self) -> str:
        return "replaced" if self.archived else self.run.status

    def age_days(self, now: dt.datetime) -> float:
        """Days since it ended (or began; else since its summary was written)."""
        summary = self.run.summary
        for key in ("finished_at", "started_at"):
            try:
                when = dt.datetime.fromisoformat(str(summary[key]))
            except (KeyError, ValueError):
                continue
            if when.tzinfo is None:
                when = when.astimezone()
            return (now - when).total_seconds() / 86400
        stamp = (self.run.folder / "summary.json").stat().st_mtime
        return (now.timestamp() - stamp) / 86400


def collect(paths: list[Path]) -> list[Entry]:
    entries = []
    for root in paths:
        if not root.exists():
            raise MetacliError(f"{root} does not exist. Give folders of runs.")
        for path in sorted(root.rglob("summary.json")):
            parts = path.relative_to(root).parts[:-1]
            if ".hydra" in parts:
                continue
            entries.append(Entry(load_run(path), ".replaced" in parts))
    return entries


def older_than(limit: str, now: dt.datetime) -> float:
    """Days from ``--older-than``: a number of days, or a date (ISO, 2026-11-30)."""
    try:
        days = float(limit)
    except ValueError:
        pass
    else:
        if not days >= 0:
            raise MetacliError(f"--older-than {limit!r}: give a number of days >= 0 (e.g. 7).")
        return days
    try:
        when = dt.datetime.fromisoformat(limit)
    except ValueError:
        raise MetacliError(
            f"--older-than {limit!r}: give a number of days (e.g. 7) or a date (2026-11-30)."
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return (now - when).total_seconds() / 86400


def select(entries: list[Entry], args: argparse.Namespace, now: dt.datetime) -> list[Entry]:
    unknown = [s for s in args.status if s not in STATUSES]
    if unknown:
        raise MetacliError(f"--status {unknown[0]}: choose among {', '.join(STATUSES)}.")
    chosen = [e for e in entries if not args.status or e.status in args.status]
    for condition in args.filter:
        key, sep, wanted = condition.partition("=")
        if not sep:
            raise MetacliError(f"--filter {condition!r}: write it as KEY=VALUE, e.g. algo=maml.")
        chosen = [e for e in chosen if matches(e.run, key, wanted)]
    if args.older_than is not None:
        days = older_than(args.older_than, now)
        chosen = [e for e in chosen if e.age_days(now) > days]
    return chosen


def describe(entry: Entry, now: dt.datetime) -> list[str]:
    run, config = entry.run, section(entry.run.summary, "config")
    groups = section(run.summary, "groups")

    def name(group: str) -> str:
        return str(section(config, group).get("name") or groups.get(group) or "-")

    value = number(section(run.summary, "test").get("mean"))
    metric = "-" if value is None else f"{run.metric_name()} {value:.4g}"
    total, diverged = run.tasks()
    if diverged:
        metric += f" ({diverged} of {total} diverged)"
    days = entry.age_days(now)
    age = f"{days * 24:.1f} h" if days < 1 else f"{days:.1f} d"
    found = labels(run)
    return [
        entry.status,
        found["name"] or "-",
        name("algo"),
        name("task"),
        name("model"),
        str(run.seed if run.seed is not None else "-"),
        str(run.summary.get("iterations") or "-"),
        metric,
        ", ".join(found["tags"]) or "-",
        age,
        str(run.folder),
    ]


COLUMNS = (
    "status",
    "name",
    "algo",
    "task",
    "model",
    "seed",
    "iterations",
    "meta-test",
    "tags",
    "age",
    "folder",
)


def table(entries: list[Entry], now: dt.datetime) -> str:
    from rich.console import Console
    from rich.table import Table

    rows = [describe(entry, now) for entry in entries]
    shown = Table()
    for column in COLUMNS:
        shown.add_column(column, no_wrap=True)
    for row in rows:
        shown.add_row(*row)
    # As wide as the widest row: a folder is copied from here, so it is never folded or cut.
    widths = [
        max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(COLUMNS)
    ]
    console = Console(file=io.StringIO(), width=sum(widths) + 3 * len(widths) + 1, record=True)
    console.print(shown)
    return console.export_text()


def live(entry: Entry) -> FolderLock | None:
    """The folder's lock, taken (None: a live process holds it, or it is an archive)."""
    if entry.archived:
        return None
    lock = FolderLock(entry.run.folder / ".lock", "metacli runs rm")
    try:
        lock.acquire()
    except MetacliError:
        return None
    return lock


def erase(folder: Path, chosen: set[Path]) -> None:
    """The run's files; its ``.replaced/`` too unless it holds a run not selected."""
    archives = folder / ".replaced"
    keep = archives.is_dir() and any(
        summary.parent not in chosen for summary in archives.rglob("summary.json")
    )
    for child in folder.iterdir():
        if child == archives and keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if not keep:
        folder.rmdir()


def remove(entries: list[Entry], yes: bool) -> int:
    if not entries:
        print("metacli runs rm: no run matches; nothing removed.")
        return 0
    if not yes:
        if not sys.stdin.isatty():
            raise MetacliError(
                f"runs rm would remove {len(entries)} run(s) (listed above); add --yes "
                f"to remove them without a question (stdin is not a terminal)."
            )
        answer = input(f"Remove these {len(entries)} run(s)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing removed.")
            return 0
    removed, kept = 0, []
    chosen = {e.run.folder for e in entries}
    for entry in entries:
        if entry.archived:
            shutil.rmtree(entry.run.folder, ignore_errors=True)  # gone with its job already?
            removed += 1
            continue
        lock = live(entry)
        if lock is None:
            kept.append(str(entry.run.folder))
            continue
        try:
            erase(entry.run.folder, chosen)
        finally:
            lock.release()
        removed += 1
    print(f"Removed {removed} run(s).")
    if kept:
        print(f"Kept {len(kept)} run(s) that a live process holds: {', '.join(kept)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metacli runs", description="List runs, or remove those a filter selects (rm)."
    )
    p.add_argument("paths", nargs="*", type=Path, default=[Path("outputs")])
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose config has KEY=VALUE (repeatable; also name=, tags=, seed=)",
    )
    p.add_argument(
        "--status",
        action="append",
        default=[],
        metavar="STATUS",
        help=f"keep runs of this status (repeatable): {', '.join(STATUSES)}",
    )
    p.add_argument("--older-than", metavar="DAYS|DATE", help="keep runs older than this")
    p.add_argument("--yes", action="store_true", help="rm: remove without asking")
    return p


def main(argv: list[str]) -> int:
    removing = bool(argv) and argv[0] == "rm"
    args = parser().parse_args(argv[1:] if removing else argv)
    if args.yes and not removing:
        raise MetacliError("--yes answers `metacli runs rm`; listing asks nothing.")
    now = dt.datetime.now().astimezone()
    chosen = select(collect(args.paths), args, now)
    sys.stdout.write(table(chosen, now) if chosen else "No runs match.\n")
    if removing:
        return remove(chosen, args.yes)
    return 0
