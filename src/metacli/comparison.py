"""`metacli compare`: every run below some folders, one row per configuration.

A run is a folder with a summary.json (single runs and multirun jobs alike). Finished
training runs (``--command test`` for meta-test runs) are grouped by their configuration
without the seed (or by ``--group-by`` keys) and aggregated over distinct seeds: the
meta-test metric's mean, its standard deviation and a 95% confidence interval across
seeds (Student t), or the run's own over test tasks when there is one seed. A seed run
twice counts once (the latest run; the others are reported, not pooled); runs of
different lengths are never pooled; paths (``data.root``, ...) never split rows. Each
metric gets its own table, ranked in its own direction (lower MSE, higher accuracy).
Runs that failed, were interrupted, crashed or are still running are counted below the
table (``--all`` lists them); a damaged summary never stops the command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import socket
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacli.config import flatten
from metacli.errors import MetacliError

# Two-sided 95% Student t quantiles by degrees of freedom (beyond 30: the normal 1.96).
T95_TEXT = """12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160
    2.145 2.131 2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048
    2.045 2.042"""
T95 = [float(t) for t in T95_TEXT.split()]
# Config keys that never distinguish configurations.
IGNORED = ("seed", "hydra", "published")
NAMES = {"algo": "algo.name", "task": "task.name", "model": "model.name"}
METRICS = ("test", "val")
FORMATS = ("table", "csv", "markdown", "json")
LOWER_IS_BETTER = ("mse", "loss", "error", "nll")


def t95(samples: int) -> float:
    df = samples - 1
    return T95[df - 1] if 1 <= df <= len(T95) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% confidence interval (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class Run:
    folder: Path
    status: str
    summary: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # flattened config, without seed

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    def value(self, metric: str) -> float | None:
        if metric == "val":
            value = (self.summary.get("best_val") or {}).get("metric")
        else:
            value = (self.summary.get("test") or {}).get("mean")
        return None if value is None else float(value)

    def metric_name(self) -> str:
        return str((self.summary.get("test") or {}).get("metric_name") or "metric")

    def higher_is_better(self) -> bool:
        """The task's direction, recorded with the meta-test (older runs: by its name)."""
        recorded = (self.summary.get("test") or {}).get("higher_is_better")
        if isinstance(recorded, bool):
            return recorded
        return not any(w in self.metric_name().lower() for w in LOWER_IS_BETTER)

    @property
    def finished_at(self) -> str:
        return str(self.summary.get("finished_at") or "")


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
    """Where files are, not what ran: never a reason to split rows."""
    last = key.rsplit(".", 1)[-1]
    return last in ("root", "resume", "ckpt_path") or last.endswith(("_dir", "_path"))


def load_run(path: Path) -> Run:
    folder = path.parent
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return Run(folder, "unreadable", {"error": f"summary.json: {err}"})
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
        params = {f"{g}.name": v for g, v in (summary.get("groups") or {}).items() if v}
        for override in summary.get("overrides") or []:
            key, _, value = str(override).partition("=")
            if key.lstrip("+~") not in IGNORED and "/" not in key and not is_path(key):
                params[key.lstrip("+~")] = value
    params["command"] = summary.get("command", "train")
    params["iterations"] = summary.get("iterations")  # done: runs of other lengths never pool
    return Run(folder, status, summary, params)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every summary.json below ``paths``, skipping hidden folders (.hydra, .replaced)."""
    runs = []
    for root in paths:
        if not root.exists():
            raise MetacliError(f"metacli compare: {root} does not exist. Give folders of runs.")
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


def matches(run: Run, key: str, wanted: str) -> bool:
    if key == "status":
        return run.status == wanted
    value = run.seed if key == "seed" else run.params.get(NAMES.get(key, key))
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
    """Hyperparameters whose values differ between configurations (shown as columns)."""
    keys = sorted({k for runs in groups for k in runs[0].params})
    shown = set(NAMES.values())
    return [
        k
        for k in keys
        if k not in shown and len({text(runs[0].params.get(k)) for runs in groups}) > 1
    ]


def distinct_seeds(members: list[Run]) -> tuple[list[Run], list[Run]]:
    """One run per seed (the latest finished); the others, reported and not pooled."""
    latest: dict[Any, Run] = {}
    for run in sorted(members, key=lambda r: (r.finished_at, str(r.folder))):
        latest[text(run.seed)] = run
    kept = list(latest.values())
    return kept, [r for r in members if r not in kept]


def aggregate(runs: list[Run], keys: list[str] | None, metric: str) -> list[dict[str, Any]]:
    groups = list(group(runs, keys).values())
    columns = keys if keys is not None else ["algo", "task", "model", *varying(groups)]
    columns = [c for c in columns if c != "iterations"]
    rows = []
    for everyone in groups:
        members, duplicates = distinct_seeds(everyone)
        first = members[0]
        values = [v for v in (r.value(metric) for r in members) if v is not None]
        mean, ci = mean_ci(values) if values else (None, None)
        std = statistics.stdev(values) if len(values) > 1 else None
        if len(members) == 1 and metric == "test":  # over test tasks
            own = first.summary.get("test") or {}
            ci = own.get("ci95") if ci is None else ci
            std = own.get("std")
        row: dict[str, Any] = {c: first.params.get(NAMES.get(c, c)) for c in columns}
        best_val = [v for v in (r.value("val") for r in members) if v is not None]
        walls = [float(r.summary["wall_time_s"]) for r in members if r.summary.get("wall_time_s")]
        speeds = [float(r.summary["it_per_s"]) for r in members if r.summary.get("it_per_s")]
        iterations = [int(r.summary["iterations"]) for r in members if r.summary.get("iterations")]
        row.update(
            {
                "seeds": len(members),
                "metric_name": first.metric_name(),
                "higher_is_better": first.higher_is_better(),
                "metric_source": metric,
                "metric": mean,
                "ci95": ci,
                "std": std,
                "best_val": statistics.fmean(best_val) if best_val else None,
                "published": published(first),
                "iterations": max(iterations) if iterations else None,
                "wall_time_s": statistics.fmean(walls) if walls else None,
                "it_per_s": statistics.fmean(speeds) if speeds else None,
                "runs": [str(r.folder) for r in members],
                "duplicate_seed_runs": [str(r.folder) for r in duplicates],
            }
        )
        rows.append(row)
    return rows


def published(run: Run) -> str | None:
    """The paper's number the run's preset names (``published:``), as "value ± ci (source)"."""
    block = (run.summary.get("config") or {}).get("published") or {}
    value = block.get("value")
    if value is None:
        return None
    ci = block.get("ci95")
    source = block.get("source")
    return (
        f"{value:g}" + (f" ± {ci:g}" if ci is not None else "") + (f" ({source})" if source else "")
    )


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


def cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column == "metric":
        if value is None:
            return "-"
        ci = row.get("ci95")
        return f"{value:.4f}" + ("" if ci is None else f" ± {ci:.4f}")
    digits = {"best_val": 4, "std": 4, "wall_time_s": 1, "it_per_s": 1}
    if column in digits and isinstance(value, float):
        return f"{value:.{digits[column]}f}"
    return text(value)


RESULTS = [
    "seeds",
    "metric",
    "std",
    "best_val",
    "published",
    "iterations",
    "wall_time_s",
    "it_per_s",
]
HIDDEN = ["metric_name", "higher_is_better", "metric_source", "ci95", "runs", "duplicate_seed_runs"]


def config_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that say which configuration a row is."""
    return [k for k in (rows[0] if rows else {}) if k not in (*RESULTS, *HIDDEN)]


def display_columns(rows: list[dict[str, Any]]) -> list[str]:
    fixed = list(RESULTS)
    if rows[0]["metric_source"] == "val":
        fixed.remove("best_val")  # it is the metric column
    if all(r.get("published") is None for r in rows):
        fixed.remove("published")  # no preset names a paper's number
    return config_columns(rows) + fixed


def header(column: str, rows: list[dict[str, Any]]) -> str:
    if column == "metric":
        source = "meta-test" if rows[0]["metric_source"] == "test" else "best val"
        better = "higher" if rows[0]["higher_is_better"] else "lower"
        return f"{source} {rows[0]['metric_name']} (mean ± 95% CI, {better} is better)"
    if column == "std":
        return "std across seeds" if rows[0]["seeds"] > 1 else "std"
    return {"wall_time_s": "wall s", "it_per_s": "it/s", "best_val": "best val"}.get(column, column)


def render(
    rows: list[dict[str, Any]], unfinished: list[Run], fmt: str, show_all: bool = False
) -> str:
    """The comparison as table (rich), markdown, csv or json text."""
    if fmt == "json":
        return json.dumps(
            {
                "rows": rows,
                "unfinished": [
                    {"folder": str(r.folder), "status": r.status, "error": r.summary.get("error")}
                    for r in unfinished
                ],
            },
            indent=2,
        )
    if fmt == "csv":
        buffer = io.StringIO()
        if rows:
            columns = [k for k in rows[0] if k not in ("runs", "duplicate_seed_runs")]
            writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return buffer.getvalue()
    lines: list[str] = []
    for name in dict.fromkeys(r["metric_name"] for r in rows):  # one table per metric
        same = [r for r in rows if r["metric_name"] == name]
        columns = display_columns(same)
        if lines:
            lines.append("")
        if fmt == "markdown":
            lines.append("| " + " | ".join(header(c, same) for c in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in same]
        else:
            lines.append(rich_table(same, columns))
    if not rows:
        lines.append("No finished runs.")
    for row in rows:
        if row["duplicate_seed_runs"]:
            which = ", ".join(f"{k}={row[k]}" for k in config_columns([row]))
            lines.append(
                f"seeds run more than once ({which}): the latest run of each seed is used; "
                f"not pooled: " + ", ".join(row["duplicate_seed_runs"])
            )
    if unfinished:
        lines.append("")
        counts: dict[str, int] = {}
        for run in unfinished:
            counts[run.status] = counts.get(run.status, 0) + 1
        kinds = ", ".join(f"{n} {status}" for status, n in counts.items())
        if not show_all:
            lines.append(f"{len(unfinished)} run(s) not finished ({kinds}); --all lists them.")
        else:
            lines.append(f"{len(unfinished)} run(s) not finished ({kinds}):")
            for run in unfinished:
                error = str(run.summary.get("error") or "").splitlines()[:1]
                lines.append(f"- {run.status}: {run.folder}" + (f" ({error[0]})" if error else ""))
    return "\n".join(lines) + "\n"


def rich_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in columns:
        numeric = column in RESULTS
        table.add_column(header(column, rows), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(cell(row, c) for c in columns))
    console = Console(file=io.StringIO(), width=max(100, 20 * len(columns)), record=True)
    console.print(table)
    return console.export_text().rstrip("\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metacli compare",
        description="Compare runs: one row per configuration, aggregated over seeds.",
    )
    p.add_argument("paths", nargs="*", type=Path, default=[Path("outputs")])
    p.add_argument("--group-by", help="comma-separated keys (e.g. algo,algo.inner_lr)")
    p.add_argument("--sort", help="a column (default: the metric, best first)")
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose config has KEY=VALUE (repeatable; also status=...)",
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="test",
        help="test: final meta-test metric; val: best validation metric",
    )
    p.add_argument(
        "--command",
        choices=("train", "test"),
        default="train",
        help="which runs: meta-training runs (default) or `metacli test` runs",
    )
    p.add_argument("--all", action="store_true", help="list runs that did not finish")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="validation curves to a PNG")
    return p


@dataclass
class Comparison:
    rows: list[dict[str, Any]]  # one per configuration, best first per metric
    unfinished: list[Run]  # runs that failed, were interrupted, crashed or still run
    runs: list[Run]  # every run found (after the filters)


def compare(
    paths: list[Path],
    group_by: list[str] | None = None,
    sort: str | None = None,
    reverse: bool = False,
    filters: list[str] | None = None,
    metric: str = "test",
    command: str = "train",
) -> Comparison:
    """The rows of the runs below ``paths`` (what the command prints): grouped by
    ``group_by`` keys (default: every setting that differs), ``filters`` as KEY=VALUE."""
    if metric not in METRICS:
        raise MetacliError(f"metric={metric!r}: choose one of {', '.join(METRICS)}.")
    runs = find_runs(paths)
    for condition in filters or []:
        key, sep, wanted = condition.partition("=")
        if not sep:
            raise MetacliError(f"--filter {condition!r}: write it as KEY=VALUE, e.g. algo=maml.")
        runs = [r for r in runs if matches(r, key, wanted)]
    runs = [r for r in runs if r.params.get("command", "train") == command]
    finished = [r for r in runs if r.status == "finished"]
    unfinished = [r for r in runs if r.status != "finished"]
    rows = sort_rows(aggregate(finished, group_by, metric), sort, reverse)
    return Comparison(rows, unfinished, runs)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    found = compare(
        args.paths, keys, args.sort, args.reverse, args.filter, args.metric, args.command
    )
    rows, unfinished, runs = found.rows, found.unfinished, found.runs
    sys.stdout.write(render(rows, unfinished, args.format, args.all))
    if args.plot is not None:
        from metacli.plots import validation_curves

        try:
            validation_curves(rows, config_columns(rows), args.plot)
        except OSError as err:
            raise MetacliError(
                f"Cannot write the figure {args.plot}: {err.strerror or err}. Give --plot a "
                f"file in a folder you can write."
            ) from None
        print(f"wrote {args.plot}", file=sys.stderr)
    if not runs:
        print(
            f"metacli compare: no runs (summary.json) below {', '.join(map(str, args.paths))}",
            file=sys.stderr,
        )
        return 1
    return 0
