"""`metacli data check|prepare`: inspect a dataset, or build its cache ahead of a run.

Both compose the same configs as `metacli train` (so `task=omniglot data.root=...` work the
same way), without creating a run folder.
"""

from __future__ import annotations

import logging
import time

from rich.table import Table

from metacli.build import typed_group
from metacli.composition import compose, config_folders
from metacli.console import CONSOLE
from metacli.errors import MetacliError
from metacli.tasks.base import TaskDistribution
from metacli.tasks.images import ImageClassTask


def load_task(overrides: list[str]) -> TaskDistribution:
    import os

    cfg = compose("train", overrides)
    task_cls, task_cfg = typed_group(cfg, "task")
    root = cfg.data.root or os.environ.get("METACLI_DATA")
    return task_cls(task_cfg, root, cfg.data.cache_dir)


def check(overrides: list[str]) -> int:
    """Print what the dataset holds per split, and every problem found; 1 if any."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    problems: list[str] = []
    try:
        task = load_task(config_folders(overrides))
    except MetacliError as err:
        CONSOLE.print(f"[red]problem:[/red] {err}", soft_wrap=True)
        return 1
    if not isinstance(task, ImageClassTask):
        CONSOLE.print(f"task={task.cfg.name} is generated, not read from files: nothing to check.")
        return 0
    table = Table(
        title=f"task={task.cfg.name}: layout {getattr(task, 'layout', '-')} in "
        f"{getattr(task, 'root', task.data_root)}",
        title_justify="left",
    )
    for column in ("split", "classes", "images per class", "image size"):
        table.add_column(column, justify="right")
    size = "x".join(str(s) for s in task.images_of("train").shape[1:])
    for split, classes in task.splits.items():
        fewest, most = int(classes.counts.min()), int(classes.counts.max())
        per_class = str(most) if fewest == most else f"{fewest}-{most}"
        table.add_row(split, str(len(classes)), per_class, size)
        if len(classes) < task.ways(split):
            problems.append(f"{split}: {len(classes)} classes < ways = {task.ways(split)}")
    problems += getattr(task, "problems", [])
    CONSOLE.print(table)
    sets = getattr(task, "character_set", None)
    if sets is not None:
        counts = {name: sets.count(name) for name in dict.fromkeys(sets)}
        CONSOLE.print("characters: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    CONSOLE.print(f"{task.decoded()} images decoded, cache ready.")
    for problem in problems:
        CONSOLE.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    if not problems:
        CONSOLE.print("No problems found.")
    return 1 if problems else 0


def prepare(overrides: list[str]) -> int:
    """Build (or find) the dataset cache, so that runs and sweeps start at once."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    start = time.perf_counter()
    try:
        task = load_task(config_folders(overrides))
    except MetacliError as err:
        CONSOLE.print(f"[red]problem:[/red] {err}", soft_wrap=True)
        return 1
    count = task.decoded() if isinstance(task, ImageClassTask) else 0
    CONSOLE.print(
        f"task={task.cfg.name}: {count} images ready in the cache "
        f"({time.perf_counter() - start:.1f} s)."
    )
    return 0
