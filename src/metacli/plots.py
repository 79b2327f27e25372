"""Figures from run folders: `metacli plot <run>` and `metacli compare --plot`.

``metacli plot`` writes into the run folder:
- ``learning_curves.png``: train loss and the validation metric against iteration;
- ``inner_steps.png``: the meta-test metric after 0..k inner steps (mean, 95% CI at k);
- ``adaptation.png`` (1-D regression, e.g. sinusoids): test tasks with the true function,
  the support points and the model before and after adaptation (MAML's figure 2).
An architecture search (``algo=metanas``) draws its cells into ``genotype.png``
(``metacli.figures``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from metacli.errors import MetacliError
from metacli.figures import pyplot

PANEL = (5.0, 3.6)  # inches per panel


def read_records(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, skipping a line torn by a kill."""
    records: list[dict[str, Any]] = []
    path = folder / "metrics.jsonl"
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [
        (int(r["iteration"]), float(r[key]))
        for r in records
        if r.get("split") == split and isinstance(r.get(key), (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def comparison_figure(rows: list[dict[str, Any]], label_keys: list[str], path: Path) -> None:
    """The figures of a comparison (``metacli compare``'s rows, labelled by ``label_keys``),
    two panels per metric (MSE and accuracy never share an axis): the validation metric
    against iteration, and the meta-test metric against inner steps; each line the mean
    over a configuration's seeds, its band one standard deviation over them (a 95%
    interval from 2-3 seeds would dwarf every difference)."""
    plt = pyplot()
    differing = [k for k in label_keys if len({str(r.get(k)) for r in rows}) > 1]
    label_keys = differing or label_keys  # what is the same on every line goes unsaid
    metrics = list(dict.fromkeys(str(r["metric_name"]) for r in rows)) or ["metric"]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(15.0, 4.5 * len(metrics)), squeeze=False)
    for (curves_ax, steps_ax), metric in zip(axes, metrics, strict=True):
        same = [r for r in rows if str(r["metric_name"]) == metric]
        for row in same:
            curve(curves_ax, row, label_keys)
            steps(steps_ax, row, label_keys)
        better = "higher" if next((r["higher_is_better"] for r in same), True) else "lower"
        curves_ax.set_xlabel("iteration")
        curves_ax.set_ylabel(f"validation {metric} ({better} is better)")
        steps_ax.set_xlabel("inner steps at the meta-test")
        steps_ax.set_ylabel(f"meta-test {metric} ({better} is better)")
        for ax in (curves_ax, steps_ax):
            title = "mean over seeds, band: ± 1 standard deviation"
            if spans_orders(ax):
                ax.set_yscale("log")
                title += " (log scale)"
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="best")  # inside the axes, never cut off
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        path, dpi=120, metadata={"Title": ", ".join(f"{m} by configuration" for m in metrics)}
    )
    plt.close(fig)


def spans_orders(ax: Any) -> bool:
    """Whether the lines' values are all positive and span more than three orders of
    magnitude: a diverging configuration would flatten every other line on a linear axis."""
    values = [float(y) for line in ax.lines for y in line.get_ydata()]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 1e3


def band(ax: Any, xs: list[int], samples: dict[int, list[float]], label: str) -> None:
    """The mean of ``samples[x]`` against ``xs``, with a band of one standard deviation."""
    means = [statistics.fmean(samples[x]) for x in xs]
    (line,) = ax.plot(xs, means, label=label, marker="o" if len(xs) < 15 else None, ms=3)
    half = [statistics.stdev(samples[x]) if len(samples[x]) > 1 else 0.0 for x in xs]
    ax.fill_between(
        xs,
        [m - h for m, h in zip(means, half, strict=True)],
        [m + h for m, h in zip(means, half, strict=True)],
        color=line.get_color(),
        alpha=0.2,
    )


def label_of(row: dict[str, Any], label_keys: list[str], seeds: int) -> str:
    parts = [f"{k}={row[k]}" for k in label_keys if row.get(k) is not None]
    return ", ".join(parts) + f" ({seeds} seed{'s' * (seeds != 1)})"


def steps(ax: Any, row: dict[str, Any], label_keys: list[str]) -> None:
    """A configuration's meta-test metric after 0..k inner steps, over its seeds."""
    per_step: dict[int, list[float]] = {}
    for folder in row["runs"]:
        summary = read_summary(Path(folder))
        means = ((summary.get("test") or {}).get("per_step") or {}).get("mean") or []
        for k, value in enumerate(means):
            if isinstance(value, (int, float)) and math.isfinite(value):
                per_step.setdefault(k, []).append(float(value))
    if per_step:
        band(ax, sorted(per_step), per_step, label_of(row, label_keys, len(row["runs"])))


def curve(ax: Any, row: dict[str, Any], label_keys: list[str]) -> None:
    """A configuration's validation metric against iteration, over its seeds."""
    curves: dict[int, list[float]] = {}
    for folder in row["runs"]:
        for it, value in zip(*series(read_records(Path(folder)), "val", "metric"), strict=True):
            if math.isfinite(value):
                curves.setdefault(it, []).append(value)
    if curves:
        band(ax, sorted(curves), curves, label_of(row, label_keys, len(row["runs"])))


def read_summary(folder: Path) -> dict[str, Any]:
    """summary.json, or nothing where it is missing or damaged."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def run_title(summary: dict[str, Any]) -> str:
    """What a run is, for every figure of it: algorithm, task, model, seed."""
    groups = summary.get("groups") or {}
    config = summary.get("config") or {}

    def name(group: str) -> str:
        return str(groups.get(group) or (config.get(group) or {}).get("name") or "?")

    return f"{name('algo')} on {name('task')} ({name('model')}), seed {summary.get('seed', '?')}"


def plot_run(folder: Path) -> list[Path]:
    """Every figure that the run's files allow; returns the files written."""
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise MetacliError(
            f"{folder} is not a run folder (no summary.json). Give a folder "
            f"under outputs/train/ or a multirun job folder."
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    title = run_title(summary)
    records = read_records(folder)
    plt = pyplot()
    written = []
    train_its, train_loss = series(records, "train", "loss")
    val_its, val_metric = series(records, "val", "metric")
    if train_its or val_its:
        fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL[0], PANEL[1]))
        axes[0].plot(train_its, train_loss)
        axes[0].set(xlabel="iteration", ylabel="train query loss", title="meta-training")
        name = next((r["metric_name"] for r in records if r.get("split") == "val"), "metric")
        axes[1].plot(val_its, val_metric, marker="o", markersize=3)
        axes[1].set(xlabel="iteration", ylabel=f"validation {name}", title="validation")
        for ax in axes:
            ax.grid(alpha=0.3)
        written.append(save(plt, fig, folder / "learning_curves.png", title))
    test = next((r for r in reversed(records) if r.get("split") == "test"), None)
    if test is not None and len(test.get("metric_per_step") or []) > 1:  # (not ProtoNets')
        per_step = test["metric_per_step"]
        fig, ax = plt.subplots(figsize=PANEL)
        ax.plot(range(len(per_step)), per_step, marker="o")
        ax.errorbar(
            [len(per_step) - 1],
            [per_step[-1]],
            yerr=[test.get("metric_ci95", 0.0)],
            capsize=4,
            color="black",
        )
        ax.set(
            xlabel="inner steps on the support set",
            ylabel=f"meta-test {test.get('metric_name', 'metric')}",
            title=f"{test.get('num_tasks', '?')} test tasks",
        )
        ax.set_xticks(range(len(per_step)))
        ax.grid(alpha=0.3)
        written.append(save(plt, fig, folder / "inner_steps.png", title))
    figure = adaptation_figure(folder, summary, plt)
    if figure is not None:
        written.append(figure)
    if not written:
        status = summary.get("status")
        if status in ("failed", "crashed", "interrupted"):
            error = f": {summary['error']}" if summary.get("error") else ""
            raise MetacliError(
                f"{folder} has nothing to plot: the run {status} before its first logged "
                f"line{error}"
            )
        raise MetacliError(f"{folder} has nothing to plot yet (metrics.jsonl is empty or missing).")
    return written


def save(plt: Any, fig: Any, path: Path, title: str) -> Path:
    """The figure with the run's title on top (and in the PNG's Title field)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)
    return path


def adaptation_figure(
    folder: Path, summary: dict[str, Any], plt: Any, tasks: int = 6
) -> Path | None:
    """1-D regression only: true function, support set, model before/after adaptation.

    The model is the run's own (rebuilt from the config its checkpoint recorded), adapted
    by its own evaluation on test tasks with a dense, noise-free query set.
    """
    checkpoints = [folder / "checkpoints" / n for n in ("best.pt", "last.pt")]
    checkpoint_path = next((p for p in checkpoints if p.exists()), None)
    if checkpoint_path is None:
        return None
    import torch

    from metacli.checkpoint import components_from
    from metacli.streams import task_keys
    from metacli.tasks.base import ClassificationTask, split_generator

    components, _ = components_from(checkpoint_path)
    regression = not isinstance(components.task, ClassificationTask) and tuple(
        components.task.input_shape
    ) == (1,)
    if not regression or not hasattr(components.task.cfg, "queries"):
        return None
    components.task.cfg.queries, components.task.cfg.test_queries = (
        200,
        None,
    )  # dense: the true function
    if hasattr(components.task.cfg, "noise"):
        components.task.cfg.noise = 0.0
    batch = components.task_for("test").sample(
        tasks, "test", split_generator(components.run.seed, "test")
    )
    order = batch.query_x[..., 0].argsort(dim=1)  # [B, Q]: queries left to right
    sort = order.unsqueeze(-1)
    batch = type(batch)(
        batch.support_x,
        batch.support_y,
        batch.query_x.gather(1, sort),
        batch.query_y.gather(1, sort),
        task_keys(components.run.seed, "test", 0, 0, tasks),
    )
    components.algorithm.eval()
    evaluation = components.algorithm.evaluate(batch, predictions=True)
    if evaluation.predictions is None:
        return None
    with torch.no_grad():
        predictions = evaluation.predictions  # [B, k+1, Q, 1]
    steps = predictions.shape[1] - 1
    columns = 3
    fig, axes = plt.subplots(
        math.ceil(tasks / columns),
        columns,
        figsize=(columns * 4.0, math.ceil(tasks / columns) * 3.0),
    )
    for i, ax in enumerate(axes.flat):
        x = batch.query_x[i, :, 0].numpy()
        ax.plot(x, batch.query_y[i, :, 0].numpy(), color="black", label="true function")
        ax.plot(
            x, predictions[i, 0, :, 0].numpy(), "--", color="tab:blue", label="before adaptation"
        )
        ax.plot(x, predictions[i, -1, :, 0].numpy(), color="tab:red", label=f"after {steps} steps")
        ax.scatter(
            batch.support_x[i, :, 0].numpy(),
            batch.support_y[i, :, 0].numpy(),
            color="tab:purple",
            zorder=3,
            label=f"{batch.support_x.shape[1]} support points",
        )
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return save(plt, fig, folder / "adaptation.png", f"{run_title(summary)}: {tasks} test tasks")
