"""`metacli compare` on summaries written by hand: seeds, lengths, commands, directions,
paths and the figure, each checked against the numbers in the files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from metacli import cli, tables


def write(
    root: Path,
    name: str,
    *,
    seed: int,
    metric: float,
    task: str = "sinusoid",
    iterations: int = 100,
    command: str = "train",
    data_root: str = "/data/a",
    finished_at: str = "2026-11-28T10:00:00",
    published: dict[str, Any] | None = None,
) -> Path:
    accuracy = task != "sinusoid"
    summary: dict[str, Any] = {
        "status": "finished",
        "command": command,
        "seed": seed,
        "finished_at": finished_at,
        "iterations": iterations,
        "groups": {"algo": "maml", "task": task, "model": "mlp"},
        "config": {
            "seed": seed,
            "algo": {"name": "maml", "inner_lr": 0.1},
            "task": {"name": task},
            "model": {"name": "mlp"},
            "train": {"iterations": iterations},
            "data": {"root": data_root, "cache_dir": f"{data_root}/cache"},
            **({"published": published} if published is not None else {}),
        },
        "test": {
            "metric_name": "accuracy" if accuracy else "mse",
            "higher_is_better": accuracy,
            "mean": metric,
            "std": 0.5,
            "ci95": 0.1,
        },
        "best_val": {"metric": metric},
    }
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def rows_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert tables.main([*argv, "--format", "json"]) == 0
    return list(json.loads(capsys.readouterr().out)["rows"])


def test_a_seed_run_twice_counts_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, (seed, value, when) in enumerate([(0, 1.0, "09"), (0, 2.0, "11"), (0, 3.0, "10")]):
        write(tmp_path, f"r{i}", seed=seed, metric=value, finished_at=f"2026-11-28T{when}:00:00")
    write(tmp_path, "r3", seed=1, metric=4.0)
    [row] = rows_of(str(tmp_path), capsys=capsys)
    assert row["seeds"] == 2  # seeds 0 and 1, not four runs
    assert row["metric"] == pytest.approx((2.0 + 4.0) / 2)  # the latest run of seed 0
    assert row["sd_seeds"] == pytest.approx(statistics.stdev([2.0, 4.0]))
    assert sorted(Path(r).name for r in row["duplicate_seed_runs"]) == ["r0", "r2"]
    tables.main([str(tmp_path)])
    assert "seeds run more than once" in capsys.readouterr().out


def test_lengths_commands_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "short", seed=0, metric=1.0, iterations=20)
    write(tmp_path, "long", seed=1, metric=2.0, iterations=5000)
    write(tmp_path, "moved", seed=2, metric=3.0, iterations=5000, data_root="/elsewhere")
    write(tmp_path, "tested", seed=0, metric=9.0, command="test")
    rows = rows_of(str(tmp_path), capsys=capsys)
    by_length = {r["iterations"]: r for r in rows}
    assert set(by_length) == {20, 5000}  # never pooled as seeds of one row
    assert by_length[5000]["seeds"] == 2  # a different data.root does not split a row
    assert all("data.root" not in r and "data.cache_dir" not in r for r in rows)
    assert all(r["metric"] != 9.0 for r in rows)  # `metacli test` runs: not by default
    [tested] = rows_of(str(tmp_path), "--command", "test", capsys=capsys)
    assert tested["metric"] == 9.0
    grouped = rows_of(str(tmp_path), "--group-by", "algo", capsys=capsys)
    assert len(grouped) == 2  # --group-by keeps lengths apart too


def test_each_metric_ranks_in_its_own_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, value in enumerate([0.3, 0.1, 0.2]):
        write(tmp_path, f"mse{i}", seed=0, metric=value, iterations=100 + i)
    for i, value in enumerate([0.6, 0.9, 0.7]):
        write(tmp_path, f"acc{i}", seed=0, metric=value, task="omniglot", iterations=100 + i)
    rows = rows_of(str(tmp_path), capsys=capsys)
    mse = [r["metric"] for r in rows if r["metric_name"] == "mse"]
    accuracy = [r["metric"] for r in rows if r["metric_name"] == "accuracy"]
    assert mse == [0.1, 0.2, 0.3] and accuracy == [0.9, 0.7, 0.6]  # best first, each
    names = [r["metric_name"] for r in rows]
    assert names == sorted(names, key=names.index)  # a metric's rows stay together
    tables.main([str(tmp_path), "--format", "markdown"])
    out = capsys.readouterr().out
    assert "meta-test mse (lower is better)" in out
    assert "meta-test accuracy (higher is better)" in out
    assert sum(line.startswith("|---|") for line in out.splitlines()) == 2  # one per metric


def test_the_figure_has_two_panels_per_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    for task in ("sinusoid", "omniglot"):
        folder = write(tmp_path, task, seed=0, metric=0.5, task=task)
        lines = [{"iteration": i, "split": "val", "metric": 0.5 + i / 100} for i in (10, 20)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    figure = tmp_path / "val.png"
    assert tables.main([str(tmp_path), "--plot", str(figure)]) == 0
    image = Image.open(figure)
    assert set(image.text["Title"].split(", ")) == {
        "mse by configuration",
        "accuracy by configuration",
    }
    assert image.size == (1800, 1080)  # a row of two panels per metric, two metrics
    cli.main(["plot", str(tmp_path)])  # `metacli plot` on a folder of runs: the same figure
    assert f"wrote {tmp_path / 'comparison.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "comparison.png").text["Title"] == image.text["Title"]


def test_a_presets_published_number_shows_next_to_its_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paper = {"value": 0.35, "ci95": None, "source": "Finn et al. 2017", "note": ""}
    write(tmp_path, "a", seed=0, metric=0.37, published=paper)
    write(tmp_path, "b", seed=1, metric=0.39, published=paper)
    write(tmp_path, "c", seed=0, metric=0.5, task="omniglot", published={"value": None})
    rows = {r["task"]: r for r in rows_of(str(tmp_path), capsys=capsys)}
    assert rows["sinusoid"]["seeds"] == 2  # the block never splits rows
    assert rows["sinusoid"]["published"] == "0.35 (Finn et al. 2017)"
    assert rows["omniglot"]["published"] is None
    assert tables.main([str(tmp_path), "--format", "markdown"]) == 0
    table = capsys.readouterr().out
    mse_part, accuracy_part = table.split("accuracy", 1)
    assert "| published |" in mse_part and "| 0.35 (Finn et al. 2017) |" in mse_part
    assert "published" not in accuracy_part  # no number for that table: no column


def test_the_figure_takes_a_log_scale_where_a_configuration_diverges(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from metacli.plots import pyplot, spans_orders

    plt = pyplot()
    fig, (diverged, calm, negative) = plt.subplots(1, 3)
    diverged.plot([0, 1], [0.7, 0.6])
    diverged.plot([0, 1], [0.8, 3e7])
    calm.plot([0, 1], [0.7, 0.6])
    calm.plot([0, 1], [0.8, 500.0])  # under three orders of magnitude
    negative.plot([0, 1], [-1.0, 3e7])
    assert [spans_orders(ax) for ax in (diverged, calm, negative)] == [True, False, False]
    plt.close(fig)
