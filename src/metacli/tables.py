"""`metacli compare`'s output: the rows of ``metacli.comparison`` as a terminal table,
markdown, LaTeX (booktabs), CSV or strict JSON.

The table shows the settings that tell the rows apart (values longer than a cell shortened
to ``[1]``, ``[2]``... with a legend below), then each row's statistics, every column
labelled by what it is: the mean, its interval over seeds and over tasks, the diverged
tasks, the paired difference to the reference row with its p-value, and the mark of the
best row and of the rows not distinguishable from it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from metacli.comparison import METRICS, Comparison, Run, compare, text
from metacli.errors import MetacliError

FORMATS = ("table", "markdown", "latex", "csv", "json")
LONGEST = 24  # a setting's value longer than this is shown as [n] with a legend
RESULTS = [
    "seeds",
    "metric",
    "ci95_seeds",
    "sd_seeds",
    "ci95_tasks",
    "diverged",
    "difference",
    "pairs",
    "p_value",
    "best_val",
    "published",
    "iterations",
    "train_time_s",
    "wall_time_s",
]
HIDDEN = [
    "metric_name",
    "higher_is_better",
    "metric_source",
    "finite_seeds",
    "tasks",
    "difference_ci95",
    "t_p",
    "wilcoxon_p",
    "p_test",
    "pairs_of",
    "reference",
    "best",
    "distinguishable",
    "eval_time_s",
    "startup_s",
    "it_per_s",
    "runs",
    "duplicate_seed_runs",
]


def plain(value: Any) -> Any:
    """JSON that strict parsers read: NaN and infinities as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that say which configuration a row is."""
    return [
        k
        for k in (rows[0] if rows else {})
        if k not in (*RESULTS, *HIDDEN, "name", "tags") and not k.startswith("_")
    ]


def display_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns worth printing: the settings, then the statistics any row has."""
    labels = [k for k in ("name", "tags") if any(r.get(k) for r in rows)]
    shown = []
    for column in RESULTS:
        values = [r.get(column) for r in rows]
        if column == "diverged" and not any(values):
            continue  # no task diverged anywhere
        if column == "best_val" and rows[0]["metric_source"] == "val":
            continue  # it is the metric column
        if column == "iterations" and len({text(v) for v in values}) == 1 and len(rows) > 1:
            continue  # the same everywhere
        if column != "metric" and all(v is None for v in values):
            continue
        shown.append(column)
    return ["mark", *config_columns(rows), *labels, *shown]


def header(column: str, rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    reference = (
        "baseline" if any(r.get("reference") and not r.get("best") for r in rows) else "best"
    )
    if column == "metric":
        source = "meta-test" if first["metric_source"] == "test" else "best val"
        better = "higher" if first["higher_is_better"] else "lower"
        return f"{source} {first['metric_name']} ({better} is better)"
    return {
        "mark": "",
        "seeds": "seeds",
        "ci95_seeds": "± 95% over seeds",
        "sd_seeds": "sd over seeds",
        "ci95_tasks": "± 95% over tasks",
        "diverged": "diverged tasks",
        "difference": f"vs {reference} (paired, ± 95%)",
        "pairs": "pairs",
        "p_value": "p",
        "best_val": "best val",
        "train_time_s": "train s",
        "wall_time_s": "wall s",
        "it_per_s": "it/s",
    }.get(column, column)


def figure(value: float, sign: bool = False) -> str:
    """Four decimals, or three significant digits in scientific notation for a value
    too large or too small for them (a diverging task's MSE)."""
    plus = "+" if sign else ""
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:{plus}.3e}"
    return f"{value:{plus}.4f}"


def cell(row: dict[str, Any], column: str, legend: dict[str, str] | None = None) -> str:
    value = row.get(column)
    if column == "mark":
        if row.get("reference"):
            return "best" if row.get("best") else "baseline"
        return "≈" if row.get("distinguishable") is False else ""
    if column == "seeds":
        finite, total = row.get("finite_seeds", value), value
        return str(total) if finite == total else f"{finite} of {total}"
    if column == "diverged":
        return f"{value} of {row.get('tasks') or '?'}" if value else "0"
    if column == "difference":
        if value is None:
            return "-"
        ci = row.get("difference_ci95")
        return figure(value, sign=True) + ("" if ci is None else f" ± {figure(ci)}")
    if column == "pairs":
        return f"{value} {row.get('pairs_of')}" if value else "-"
    if column == "p_value":
        if value is None:
            return "-"
        return f"{value:.3g}" + (" (W)" if row.get("p_test") == "wilcoxon" else "")
    if column in ("metric", "ci95_seeds", "sd_seeds", "ci95_tasks", "best_val"):
        return "-" if value is None else figure(value)
    if column in ("train_time_s", "wall_time_s") and isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    shown = text(value)
    if legend is not None and len(shown) > LONGEST:
        key = f"{column} = {shown}"
        legend.setdefault(key, f"[{len(legend) + 1}]")
        return legend[key]
    return shown


def notes(rows: list[dict[str, Any]], unfinished: list[Run], show_all: bool) -> list[str]:
    """What the table does not show: the seeds run twice, the runs not compared."""
    lines = []
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
                why = f" ({run.reason})" if run.reason else ""
                lines.append(f"- {run.status}: {run.folder}{why}")
    return lines


def key_lines(rows: list[dict[str, Any]], legend: dict[str, str]) -> list[str]:
    """The legend of shortened values and of the marks."""
    lines = [f"{short} {full}" for full, short in legend.items()]
    if any(r.get("difference") is not None for r in rows):
        lines.append(
            "vs best/baseline: the mean paired difference (per task within a seed, then over "
            "seeds) ± its 95% t interval; p: paired t-test, (W) Wilcoxon signed-rank where "
            "the differences are heavy-tailed; ≈: not distinguishable at the 5% level"
        )
    return lines


def latex(rows: list[dict[str, Any]], columns: list[str], legend: dict[str, str]) -> list[str]:
    def escape(value: str) -> str:
        for char, replaced in (
            ("\\", r"\textbackslash{}"),
            ("_", r"\_"),
            ("%", r"\%"),
            ("&", r"\&"),
            ("#", r"\#"),
            ("$", r"\$"),
        ):
            value = value.replace(char, replaced)
        return value.replace("±", r"$\pm$").replace("≈", r"$\approx$")

    align = "".join("r" if c in RESULTS else "l" for c in columns)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(escape(header(c, rows)) for c in columns) + r" \\")
    lines.append(r"\midrule")
    for row in rows:
        cells = [escape(cell(row, c, legend)) for c in columns]
        if row.get("best"):
            cells = [rf"\textbf{{{c}}}" if c not in ("", "-") else c for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines


def render(comparison: Comparison, fmt: str, show_all: bool = False) -> str:
    """The comparison as table (rich), markdown, latex, csv or json text."""
    rows, unfinished = comparison.rows, comparison.unfinished
    if fmt == "json":
        report = {
            "rows": plain(rows),
            "unfinished": [
                {"folder": str(r.folder), "status": r.status, "error": r.reason or None}
                for r in unfinished
            ],
        }
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        if rows:
            columns = [k for k in plain(rows[0]) if k not in ("runs", "duplicate_seed_runs")]
            writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(plain(rows))
        return buffer.getvalue()
    lines: list[str] = []
    for name in dict.fromkeys(r["metric_name"] for r in rows):  # one table per metric
        same = [r for r in rows if r["metric_name"] == name]
        columns = display_columns(same)
        legend: dict[str, str] = {}
        if lines:
            lines.append("")
        if fmt == "markdown":
            lines.append("| " + " | ".join(header(c, same) for c in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(cell(r, c, legend) for c in columns) + " |" for r in same]
        elif fmt == "latex":
            lines += latex(same, columns, legend)
        else:
            lines.append(rich_table(same, columns, legend))
        lines += key_lines(same, legend)
    if not rows:
        lines.append("No finished runs.")
    lines += notes(rows, unfinished, show_all)
    return "\n".join(lines) + "\n"


def rich_table(rows: list[dict[str, Any]], columns: list[str], legend: dict[str, str]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in columns:
        table.add_column(header(column, rows), justify="right" if column in RESULTS else "left")
    for row in rows:
        table.add_row(*(cell(row, c, legend) for c in columns))
    console = Console(file=io.StringIO(), width=max(100, 16 * len(columns)), record=True)
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
        help="keep runs whose config has KEY=VALUE (repeatable; also status=, name=, tags=)",
    )
    p.add_argument(
        "--baseline",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="compare every row with the one row these select, not with the best",
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
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="validation curves with seed bands, and the metric against inner steps",
    )
    return p


def plot_runs(folder: Path) -> Path:
    """``metacli plot`` on a folder of runs (a sweep, ``outputs/``): the comparison figure
    of its configurations, as ``compare --plot`` draws it, into ``<folder>/comparison.png``."""
    found = compare([folder], None, None, False, [], "test", "train", None)
    if not found.rows:
        raise MetacliError(
            f"{folder} is neither a run folder (no summary.json) nor a folder "
            f"of finished training runs. Give a run folder (outputs/train/<date>/<time>) or "
            f"a sweep's folder (outputs/multirun/<date>/<time>)."
        )
    path = folder / "comparison.png"
    from metacli.plots import comparison_figure

    comparison_figure(found.rows, config_columns(found.rows), path)
    return path


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    baseline = [c.strip() for c in args.baseline.split(",")] if args.baseline else None
    found = compare(
        args.paths,
        keys,
        args.sort,
        args.reverse,
        args.filter,
        args.metric,
        args.command,
        baseline,
    )
    sys.stdout.write(render(found, args.format, args.all))
    sys.stdout.flush()  # the table before any line on stderr
    if args.plot is not None:
        from metacli.plots import comparison_figure

        try:
            comparison_figure(found.rows, config_columns(found.rows), args.plot)
        except OSError as err:
            raise MetacliError(
                f"Cannot write the figure {args.plot}: {err.strerror or err}. Give --plot a "
                f"file in a folder you can write."
            ) from None
        print(f"wrote {args.plot}", file=sys.stderr)
    if not found.runs:
        other = "test" if args.command == "train" else "train"
        hint = (
            f", but {found.elsewhere} run(s) of metacli {other}: add --command {other}"
            if found.elsewhere
            else ""
        )
        print(
            f"metacli compare: no runs of metacli {args.command} (summary.json) below "
            f"{', '.join(map(str, args.paths))}{hint}",
            file=sys.stderr,
        )
        return 1
    return 0
