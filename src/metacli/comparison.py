"""`metacli compare`: every run below some folders, one row per configuration, and how the
rows compare.

A run is a folder with a summary.json (single runs and multirun jobs alike). Finished runs
(``--command test`` for meta-test runs) are grouped by their configuration without the
seed (or by ``--group-by`` keys); a seed run twice counts once (the latest run; the
others are reported, not pooled); runs of different lengths never pool; paths, ``name``
and ``tags`` never split rows. Each metric gets its own table, ranked in its own
direction. Two kinds of uncertainty are never mixed:

- **over seeds**: the mean, standard deviation and Student-t 95% interval of the seeds'
  values, where at least two seeds have a finite one;
- **over tasks, within a seed**: each run's own 95% interval over its test tasks (the
  mean of the seeds' where there are several).

Configurations with the same seed meet the same tasks, so each row is compared with the
best row (or ``--baseline``) on paired data from the runs' ``tasks.csv``: per task within
a seed, then over seeds (``metacli.stats.paired``).

Nothing in a run's files stops the command: a run that failed, was interrupted, crashed,
still runs, or whose summary is damaged or of another version, is counted below the
table, and a value that is missing, NaN or infinite counts as no value.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacli import stats
from metacli.config import flatten, is_path_key
from metacli.errors import MetacliError

# Config keys that never distinguish configurations.
IGNORED = ("seed", "hydra", "published", "name", "tags")
NAMES = {"algo": "algo.name", "task": "task.name", "model": "model.name"}
METRICS = ("test", "val")
LOWER_IS_BETTER = ("mse", "loss", "error", "nll")
SIGNIFICANCE = 0.05  # rows whose paired p-value is at least this are not distinguishable


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, infinite, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def section(summary: dict[str, Any], key: str) -> dict[str, Any]:
    value = summary.get(key)
    return value if isinstance(value, dict) else {}


@dataclass
class Run:
    folder: Path
    status: str
    summary: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # flattened config, without seed
    reason: str = ""  # why a run is not compared

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    def value(self, metric: str) -> float | None:
        """The run's metric: its meta-test, or its best validation (None: none finite)."""
        if metric == "val":
            return number(section(self.summary, "best_val").get("metric"))
        return number(section(self.summary, "test").get("mean"))

    def metric_name(self) -> str:
        return str(section(self.summary, "test").get("metric_name") or "metric")

    def higher_is_better(self) -> bool:
        """The task's direction, recorded with the meta-test (older runs: by its name)."""
        recorded = section(self.summary, "test").get("higher_is_better")
        if isinstance(recorded, bool):
            return recorded
        return not any(w in self.metric_name().lower() for w in LOWER_IS_BETTER)

    def tasks(self, metric: str = "test") -> tuple[int | None, int]:
        """The meta-test's tasks and how many diverged (older runs: ``nonfinite_tasks``);
        for ``val``, the best validation's."""
        if metric == "val":
            total = section(section(self.summary, "config"), "val").get("num_tasks")
            diverged = section(self.summary, "best_val").get("diverged_tasks", 0)
            return (total if isinstance(total, int) else None), (
                diverged if isinstance(diverged, int) else 0
            )
        test = section(self.summary, "test")
        total = test.get("num_tasks")
        diverged = test.get("diverged_tasks", test.get("nonfinite_tasks", 0))
        return (total if isinstance(total, int) else None), (
            diverged if isinstance(diverged, int) else 0
        )

    def seconds(self, key: str) -> float | None:
        return number(self.summary.get(key))

    @property
    def finished_at(self) -> str:
        return str(self.summary.get("finished_at") or "")

    def per_task(self, metric: str) -> dict[int, float] | None:
        """Each task's final-step metric from tasks.csv (NaN where it diverged: its
        ``diverged`` column, or, in files without one, a non-finite metric at some step):
        the meta-test's, or the best validation's; None where the file has none."""
        path = self.folder / "tasks.csv"
        if not path.is_file():
            return None
        split = "val" if metric == "val" else "test"
        wanted = section(self.summary, "best_val").get("iteration") if metric == "val" else None
        rows: dict[int, dict[int, tuple[int, float]]] = {}  # iteration -> task -> (step, value)
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    if row.get("split") != split:
                        continue
                    at, task = int(row["iteration"]), int(row["task"])
                    step, value = int(row["step"]), float(row["metric"])
                    seen = rows.setdefault(at, {}).get(task)
                    if row.get("diverged") == "1" or (seen and not math.isfinite(seen[1])):
                        value = math.nan  # diverged once, diverged for good
                    if seen is None or step >= seen[0]:
                        rows[at][task] = (step, value)
                    elif not math.isfinite(value):
                        rows[at][task] = (seen[0], math.nan)
        except (OSError, KeyError, TypeError, ValueError, csv.Error):
            return None
        if not rows:
            return None
        at = wanted if wanted in rows else max(rows)
        return {task: value for task, (_, value) in rows[at].items()}


def process_alive(summary: dict[str, Any]) -> bool | None:
    """Whether a 'running' run's process still exists (None: it ran on another host)."""
    if summary.get("host") != socket.gethostname() or not isinstance(summary.get("pid"), int):
        return None
    try:
        os.kill(summary["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_path(key: str) -> bool:
    """Where files are, not what ran: never a reason to split rows (model.genotype names
    which architecture ran, so it does)."""
    return is_path_key(key) and not key.endswith("genotype")


def load_run(path: Path) -> Run:
    """The run of a summary.json, whatever the file holds."""
    folder = path.parent
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return Run(folder, "unreadable", {}, reason=f"summary.json: {err}")
    try:
        return described(folder, summary)
    except Exception as err:  # a summary of another shape: reported, never fatal
        return Run(folder, "unreadable", summary, reason=f"summary.json: {type(err).__name__}")


def described(folder: Path, summary: dict[str, Any]) -> Run:
    status = str(summary.get("status", "unknown"))
    if status == "running" and process_alive(summary) is False:
        status = "crashed"  # killed without a chance to record it
    config = summary.get("config")
    if isinstance(config, dict):
        params = {
            k: v
            for k, v in flatten(config).items()
            if k.split(".")[0] not in IGNORED and not is_path(k)
        }
    else:  # an older summary: the chosen groups and the overrides are all there is
        params = {f"{g}.name": v for g, v in section(summary, "groups").items() if v}
        for override in summary.get("overrides") or []:
            key, _, value = str(override).partition("=")
            key = key.lstrip("+~")
            if key.split(".")[0] not in IGNORED and "/" not in key and not is_path(key):
                params[key] = value
    params["command"] = summary.get("command", "train")
    params["iterations"] = summary.get("iterations")  # done: runs of other lengths never pool
    reason = str(summary.get("error") or "")
    return Run(folder, status, summary, params, reason.splitlines()[0] if reason else "")


def find_runs(paths: list[Path]) -> list[Run]:
    """Every summary.json below ``paths``, skipping hidden folders (.hydra, .replaced)."""
    runs = []
    for root in paths:
        if not root.exists():
            raise MetacliError(f"{root} does not exist. Give folders of runs.")
        files = [root] if root.is_file() else sorted(root.rglob("summary.json"))
        for path in files:
            parts = path.relative_to(root).parts if root.is_dir() else ()
            if any(part.startswith(".") for part in parts[:-1]):
                continue
            runs.append(load_run(path))
    return runs


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def labels(run: Run) -> dict[str, Any]:
    """The run's ``name`` and ``tags`` (shown and filterable, never splitting rows)."""
    name, tags = run.summary.get("name"), run.summary.get("tags")
    return {
        "name": name if isinstance(name, str) else None,
        "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
    }


def matches(run: Run, key: str, wanted: str) -> bool:
    if key == "status":
        return run.status == wanted
    if key in ("name", "tags"):
        found = labels(run)[key]
        return wanted in found if key == "tags" else str(found) == wanted
    return same_value(run.seed if key == "seed" else run.params.get(NAMES.get(key, key)), wanted)


def same_value(value: Any, wanted: str) -> bool:
    """A filter's match: numbers by value (0.1 = 1e-1), other values by their text."""
    if value is None:
        return False
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value).lower() == wanted.lower()


def group(runs: list[Run], keys: list[str] | None) -> dict[tuple[Any, ...], list[Run]]:
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        if keys is None:
            identity = tuple(sorted((k, text(v)) for k, v in run.params.items()))
        else:
            identity = tuple((k, text(run.params.get(NAMES.get(k, k)))) for k in keys)
            identity += (("iterations", text(run.params.get("iterations"))),)
        identity += (("metric", run.metric_name()),)
        groups.setdefault(identity, []).append(run)
    return groups


def varying(groups: list[list[Run]]) -> list[str]:
    """The settings that tell configurations apart: those two configurations that both
    have them set differently (a setting only some algorithms have is not one)."""
    keys = sorted({k for runs in groups for k in runs[0].params})
    shown = set(NAMES.values())
    out = []
    for key in keys:
        if key in shown or key in ("command", "iterations"):
            continue
        values = {text(runs[0].params[key]) for runs in groups if key in runs[0].params}
        if len(values) > 1:
            out.append(key)
    return out


def distinct_seeds(members: list[Run]) -> tuple[list[Run], list[Run]]:
    """One run per seed (the latest finished); the others, reported and not pooled."""
    latest: dict[Any, Run] = {}
    for run in sorted(members, key=lambda r: (r.finished_at, str(r.folder))):
        latest[text(run.seed)] = run
    kept = list(latest.values())
    return kept, [r for r in members if r not in kept]


def mean_of(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def aggregate(runs: list[Run], keys: list[str] | None, metric: str) -> list[dict[str, Any]]:
    groups = list(group(runs, keys).values())
    columns = keys if keys is not None else ["algo", "task", "model", *varying(groups)]
    columns = [c for c in columns if c != "iterations"]
    rows = []
    for everyone in groups:
        members, duplicates = distinct_seeds(everyone)
        first = members[0]
        values = [v for v in (r.value(metric) for r in members) if v is not None]
        spread = stats.sd(values) if len(values) > 1 else None
        within = [number(section(r.summary, "test").get("ci95")) for r in members]
        tasks = [r.tasks(metric) for r in members]
        row: dict[str, Any] = {c: first.params.get(NAMES.get(c, c)) for c in columns}
        names = {labels(r)["name"] for r in members} - {None}
        tags = sorted({t for r in members for t in labels(r)["tags"]})
        row.update(
            {
                **({"name": ", ".join(sorted(map(str, names)))} if names else {}),
                **({"tags": tags} if tags else {}),
                "metric_name": first.metric_name(),
                "higher_is_better": first.higher_is_better(),
                "metric_source": metric,
                "seeds": len(members),
                "finite_seeds": len(values),
                "metric": mean_of(values),
                "sd_seeds": spread,
                "ci95_seeds": stats.mean_ci(values)[1] if len(values) > 1 else None,
                "ci95_tasks": mean_of([c for c in within if c is not None])
                if metric == "test"
                else None,
                "tasks": sum(t for t, _ in tasks if t is not None) or None,
                "diverged": sum(d for _, d in tasks),
                "best_val": mean_of([v for r in members if (v := r.value("val")) is not None]),
                "published": published(first),
                "iterations": max(
                    (i for r in members if isinstance(i := r.summary.get("iterations"), int)),
                    default=None,
                ),
                **{
                    key: mean_of([s for r in members if (s := r.seconds(key)) is not None])
                    for key in ("train_time_s", "eval_time_s", "wall_time_s", "startup_s")
                },
                "it_per_s": mean_of([s for r in members if (s := r.seconds("it_per_s"))]),
                "runs": [str(r.folder) for r in members],
                "duplicate_seed_runs": [str(r.folder) for r in duplicates],
                "_members": members,  # (for the paired comparison; never printed)
            }
        )
        rows.append(row)
    return rows


def published(run: Run) -> str | None:
    """The paper's number the run's preset names (``published:``), as "value ± ci (source)"."""
    block = section(section(run.summary, "config"), "published")
    value = number(block.get("value"))
    if value is None:
        return None
    ci = number(block.get("ci95"))
    source = block.get("source")
    return (
        f"{value:g}" + (f" ± {ci:g}" if ci is not None else "") + (f" ({source})" if source else "")
    )


def paired_to(reference: dict[str, Any], row: dict[str, Any], metric: str) -> dict[str, Any]:
    """``row`` minus ``reference`` on the tasks both met: per task within each seed both
    ran (tasks that diverged in either left out), then over seeds where there are at least
    two, else over the one seed's tasks."""
    mine = {text(r.seed): r for r in row["_members"]}
    theirs = {text(r.seed): r for r in reference["_members"]}
    per_seed: list[list[float]] = []
    for seed in sorted(mine.keys() & theirs.keys()):
        a, b = mine[seed].per_task(metric), theirs[seed].per_task(metric)
        if a is None or b is None:
            continue
        both = [a[t] - b[t] for t in sorted(a.keys() & b.keys()) if math.isfinite(a[t] - b[t])]
        if both:
            per_seed.append(both)
    if not per_seed:
        return {"pairs": 0, "pairs_of": None}
    if len(per_seed) > 1:
        result, unit = stats.paired([statistics.fmean(d) for d in per_seed]), "seeds"
    else:
        result, unit = stats.paired(per_seed[0]), "tasks"
    return {
        "difference": result.difference,
        "difference_ci95": result.ci95,
        "p_value": result.p,
        "t_p": result.t_p,
        "wilcoxon_p": result.wilcoxon_p,
        "p_test": "wilcoxon" if result.heavy_tailed else "t",
        "pairs": result.n,
        "pairs_of": unit,
    }


def compare_rows(rows: list[dict[str, Any]], metric: str, baseline: list[str] | None) -> None:
    """Mark each metric's best row (or the ``baseline`` row) and compare every other row
    with it on paired data; a row whose p-value is at least 5% is not distinguishable."""
    for name in dict.fromkeys(r["metric_name"] for r in rows):
        same = [r for r in rows if r["metric_name"] == name]
        if baseline:
            chosen = [r for r in same if all(row_matches(r, c) for c in baseline)]
            if len(chosen) != 1:
                raise MetacliError(
                    f"--baseline {','.join(baseline)} matches {len(chosen)} rows of the "
                    f"{name} table; give key=value pairs that pick exactly one."
                )
            reference = chosen[0]
        else:
            ranked = [r for r in same if r["metric"] is not None]
            if not ranked:
                continue
            pick = max if same[0]["higher_is_better"] else min
            reference = pick(ranked, key=lambda r: r["metric"])
        for row in same:
            row["reference"] = row is reference
            row["best"] = row is reference and not baseline
            if row is reference:
                continue
            row.update(paired_to(reference, row, metric))
            p = row.get("p_value")
            row["distinguishable"] = None if p is None else bool(p < SIGNIFICANCE)


def row_matches(row: dict[str, Any], condition: str) -> bool:
    key, _, wanted = condition.partition("=")
    return same_value(row.get(key), wanted)


def sort_rows(rows: list[dict[str, Any]], key: str | None, reverse: bool) -> list[dict[str, Any]]:
    """Rows of each metric together (in order of first appearance), each metric's rows
    best first by default: a metric's direction never ranks another's rows."""
    if rows and key is not None and key not in rows[0]:
        names = ", ".join(k for k in rows[0] if k not in ("runs", "duplicate_seed_runs"))
        raise MetacliError(f"--sort {key}: no such column; choose one of {names}.")
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["metric_name"] for r in rows):
        same = [r for r in rows if r["metric_name"] == name]
        column, descending = key or "metric", reverse
        if key is None:  # best first
            descending = same[0]["higher_is_better"] ^ reverse

        def order(row: dict[str, Any], column: str = column) -> Any:
            value = row[column]
            return value if isinstance(value, (int, float)) else str(value)

        present = [r for r in same if r.get(column) is not None]
        missing = [r for r in same if r.get(column) is None]  # always last
        out += sorted(present, key=order, reverse=descending) + missing
    return out


@dataclass
class Comparison:
    rows: list[dict[str, Any]]  # one per configuration, best first per metric
    unfinished: list[Run]  # runs that failed, were interrupted, crashed or still run
    runs: list[Run]  # every run found (after the filters)
    elsewhere: int = 0  # runs found of the other command (train or test), not compared


def compare(
    paths: list[Path],
    group_by: list[str] | None = None,
    sort: str | None = None,
    reverse: bool = False,
    filters: list[str] | None = None,
    metric: str = "test",
    command: str = "train",
    baseline: list[str] | None = None,
) -> Comparison:
    """The rows of the runs below ``paths`` (what the command prints): grouped by
    ``group_by`` keys (default: every setting that differs), ``filters`` as KEY=VALUE,
    compared with the best row or the ``baseline`` row (KEY=VALUE conditions)."""
    if metric not in METRICS:
        raise MetacliError(f"metric={metric!r}: choose one of {', '.join(METRICS)}.")
    runs = find_runs(paths)
    for condition in filters or []:
        key, sep, wanted = condition.partition("=")
        if not sep:
            raise MetacliError(f"--filter {condition!r}: write it as KEY=VALUE, e.g. algo=maml.")
        runs = [r for r in runs if matches(r, key, wanted)]
    elsewhere = sum(r.params.get("command", "train") != command for r in runs)
    runs = [r for r in runs if r.params.get("command", "train") == command]
    finished = [r for r in runs if r.status == "finished"]
    unfinished = [r for r in runs if r.status != "finished"]
    rows = aggregate(finished, group_by, metric)
    compare_rows(rows, metric, baseline)
    return Comparison(sort_rows(rows, sort, reverse), unfinished, runs, elsewhere)
