"""`metacli compare`'s statistics on runs written by hand, each number recomputed apart
(scipy): the two kinds of uncertainty, diverged tasks and seeds, the paired comparison with
the best row or a baseline, the marks, the formats, and damaged summaries."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from metacli import tables
from metacli.errors import MetacliError

scipy_stats = pytest.importorskip("scipy.stats")
TASKS = 40


def run(
    root: Path,
    name: str,
    algo: str,
    seed: int,
    per_task: list[float],
    *,
    best_val: float | None = 0.5,
) -> Path:
    """A finished run whose meta-test is ``per_task`` (NaN: a task that diverged)."""
    finite = [v for v in per_task if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    ci = 1.96 * statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else 0.0
    summary: dict[str, Any] = {
        "status": "finished",
        "command": "train",
        "seed": seed,
        "iterations": 100,
        "finished_at": f"2026-12-01T10:00:{seed:02d}",
        "config": {
            "seed": seed,
            "algo": {"name": algo},
            "task": {"name": "omniglot"},
            "model": {"name": "conv4"},
        },
        "test": {
            "metric_name": "accuracy",
            "higher_is_better": True,
            "mean": mean,
            "ci95": ci,
            "num_tasks": len(per_task),
            "diverged_tasks": len(per_task) - len(finite),
        },
        "best_val": {"metric": best_val, "iteration": 100},
    }
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = ["split,iteration,seed,task,step,metric"]
    for task, value in enumerate(per_task):
        rows.append(f"test,100,{seed},{task},0,0.2")
        rows.append(f"test,100,{seed},{task},1,{value!r}")
    (folder / "tasks.csv").write_text("\n".join(rows) + "\n")
    return folder


def draws(seed: int, mean: float, heavy: bool = False) -> list[float]:
    rng = random.Random(seed)
    values = [min(1.0, max(0.0, rng.gauss(mean, 0.08))) for _ in range(TASKS)]
    if heavy:
        values[:4] = [0.0, 0.02, 1.0, 0.99]
    return values


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, dict[int, list[float]]]:
    """A (best, 3 seeds), B (3 seeds: one diverged as a whole, one with 2 diverged tasks),
    C (one seed, heavy tails), each seed meeting the same 40 tasks."""
    table: dict[str, dict[int, list[float]]] = {"a": {}, "b": {}, "c": {}}
    for seed in (0, 1, 2):
        table["a"][seed] = draws(seed, 0.80)
        b = draws(100 + seed, 0.77)
        if seed == 1:
            b = [math.nan] * TASKS  # every task diverged: no finite meta-test
        if seed == 2:
            b[5], b[9] = math.nan, math.nan
        table["b"][seed] = b
    table["c"][0] = draws(7, 0.79, heavy=True)
    for algo, seeds in table.items():
        for seed, values in seeds.items():
            run(tmp_path, f"{algo}{seed}", algo, seed, values)
    return table


def rows_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    assert tables.main([*argv, "--format", "json"]) == 0
    out = capsys.readouterr().out
    strict = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    return {row["algo"]: row for row in strict["rows"]}


def finite_mean(values: list[float]) -> float:
    return statistics.fmean(v for v in values if math.isfinite(v))


def test_uncertainty_over_seeds_and_over_tasks_never_mixed(
    tmp_path: Path, runs: dict[str, dict[int, list[float]]], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_of(str(tmp_path), capsys=capsys)
    a = [finite_mean(v) for v in runs["a"].values()]
    assert rows["a"]["metric"] == pytest.approx(statistics.fmean(a))
    assert rows["a"]["sd_seeds"] == pytest.approx(statistics.stdev(a))
    _, high = scipy_stats.t.interval(0.95, 2, loc=0, scale=scipy_stats.sem(a))
    assert rows["a"]["ci95_seeds"] == pytest.approx(high)
    # B: seed 1 diverged on every task, so two seeds have a value
    b = [finite_mean(runs["b"][s]) for s in (0, 2)]
    assert (rows["b"]["seeds"], rows["b"]["finite_seeds"]) == (3, 2)
    assert rows["b"]["metric"] == pytest.approx(statistics.fmean(b))
    assert (rows["b"]["diverged"], rows["b"]["tasks"]) == (TASKS + 2, 3 * TASKS)
    # C: one seed, so no across-seed columns; the interval over its tasks stands alone
    assert rows["c"]["ci95_seeds"] is None and rows["c"]["sd_seeds"] is None
    finite = runs["c"][0]
    assert rows["c"]["ci95_tasks"] == pytest.approx(
        1.96 * statistics.stdev(finite) / math.sqrt(TASKS)
    )


def test_paired_differences_to_the_best_row(
    tmp_path: Path, runs: dict[str, dict[int, list[float]]], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_of(str(tmp_path), capsys=capsys)
    assert rows["a"]["best"] and rows["a"]["reference"] and "difference" not in rows["a"]
    # B - A over the seeds both have (1 has no finite task of B), tasks finite in both
    per_seed = []
    for seed in (0, 2):
        pairs = [
            b - a for a, b in zip(runs["a"][seed], runs["b"][seed], strict=True) if math.isfinite(b)
        ]
        per_seed.append(statistics.fmean(pairs))
    b = rows["b"]
    assert (b["pairs"], b["pairs_of"]) == (2, "seeds")
    assert b["difference"] == pytest.approx(statistics.fmean(per_seed))
    assert b["t_p"] == pytest.approx(scipy_stats.ttest_1samp(per_seed, 0).pvalue)
    low, high = scipy_stats.t.interval(
        0.95, 1, loc=b["difference"], scale=scipy_stats.sem(per_seed)
    )
    assert b["difference_ci95"] == pytest.approx((high - low) / 2)
    # C - A: one common seed, so over its tasks; heavy tails hand the decision to Wilcoxon
    differences = [c - a for a, c in zip(runs["a"][0], runs["c"][0], strict=True)]
    c = rows["c"]
    assert (c["pairs"], c["pairs_of"], c["p_test"]) == (TASKS, "tasks", "wilcoxon")
    assert c["difference"] == pytest.approx(statistics.fmean(differences))
    assert c["t_p"] == pytest.approx(scipy_stats.ttest_1samp(differences, 0).pvalue)
    wilcoxon = scipy_stats.wilcoxon(differences, method="approx", correction=False)
    assert c["p_value"] == c["wilcoxon_p"] == pytest.approx(wilcoxon.pvalue)
    for row in (b, c):
        assert row["distinguishable"] is (row["p_value"] < 0.05)


def test_a_baseline_row_instead_of_the_best(
    tmp_path: Path, runs: dict[str, dict[int, list[float]]], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = rows_of(str(tmp_path), "--baseline", "algo=c", capsys=capsys)
    assert rows["c"]["reference"] and not rows["c"]["best"]
    differences = [a - c for a, c in zip(runs["a"][0], runs["c"][0], strict=True)]
    assert rows["a"]["pairs_of"] == "tasks" and rows["a"]["difference"] == pytest.approx(
        statistics.fmean(differences)
    )
    with pytest.raises(MetacliError, match="matches 0 rows"):
        tables.main([str(tmp_path), "--baseline", "algo=nosuch"])


def test_the_formats(
    tmp_path: Path, runs: dict[str, dict[int, list[float]]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert tables.main([str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert latex.startswith("\\begin{tabular}") and "\\toprule" in latex and "\\bottomrule" in latex
    best = next(line for line in latex.splitlines() if "\\textbf{best}" in line)
    assert "\\textbf{a}" in best
    assert tables.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for label in (
        "± 95% over seeds",
        "sd over seeds",
        "± 95% over tasks",
        "diverged tasks",
        "vs best (paired, ± 95%)",
        "2 of 3",
        f"{TASKS + 2} of {3 * TASKS}",
    ):
        assert label in table, label


def test_damaged_and_foreign_summaries_never_stop_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, "good", "a", 0, draws(0, 0.8))
    bad = {
        "list": "[1, 2]",
        "torn": '{"status": "finished", "test": {"mean": 0.',
        "strings": json.dumps(
            {"status": "finished", "seed": "zero", "test": "n/a", "config": {"algo": {"name": "a"}}}
        ),
        "inf": json.dumps(
            {
                "status": "finished",
                "seed": 3,
                "iterations": 100,
                "test": {
                    "mean": "Infinity",
                    "ci95": None,
                    "metric_name": "accuracy",
                    "higher_is_better": True,
                },
                "config": {
                    "algo": {"name": "a"},
                    "task": {"name": "omniglot"},
                    "model": {"name": "conv4"},
                },
            }
        ),
        "old": json.dumps(
            {
                "status": "finished",
                "seed": 4,
                "groups": {"algo": "a"},
                "overrides": ["algo=a"],
                "test": {"mean": float("nan"), "nonfinite_tasks": 3},
            }
        ),
    }
    for name, content in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(content)
    half = tmp_path / "half"
    half.mkdir()
    (half / "tasks.csv").write_text("split,iteration\ntest,1")  # no summary at all
    assert tables.main([str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [good] = [r for r in report["rows"] if any(f.endswith("good") for f in r["runs"])]
    # the infinite meta-test is the same configuration: a seed without a finite value
    assert (good["seeds"], good["finite_seeds"]) == (2, 1)
    assert good["metric"] == pytest.approx(finite_mean(draws(0, 0.8)))
    assert tables.main([str(tmp_path), "--all"]) == 0
    listed = capsys.readouterr().out
    assert "unreadable" in listed and "list" in listed and "torn" in listed


def test_metric_val_counts_the_seeds_with_a_finite_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = draws(0, 0.8)
    run(tmp_path, "a0", "a", 0, values, best_val=0.61)
    run(tmp_path, "a1", "a", 1, values, best_val=None)  # never a finite validation
    run(tmp_path, "a2", "a", 2, values, best_val=0.65)
    for name in ("a0", "a1", "a2"):  # 8 validation tasks, all of a1's diverged
        path = tmp_path / name / "summary.json"
        summary = json.loads(path.read_text())
        summary["config"]["val"] = {"num_tasks": 8}
        summary["best_val"]["diverged_tasks"] = 8 if name == "a1" else 0
        path.write_text(json.dumps(summary))
    rows = rows_of(str(tmp_path), "--metric", "val", capsys=capsys)
    assert (rows["a"]["seeds"], rows["a"]["finite_seeds"]) == (3, 2)
    assert (rows["a"]["diverged"], rows["a"]["tasks"]) == (8, 24)  # the validations' own
    assert rows["a"]["metric"] == pytest.approx(0.63)
    assert rows["a"]["sd_seeds"] == pytest.approx(statistics.stdev([0.61, 0.65]))
    # the meta-test of the same runs: every seed has a value
    rows = rows_of(str(tmp_path), capsys=capsys)
    assert (rows["a"]["seeds"], rows["a"]["finite_seeds"]) == (3, 3)
    assert (rows["a"]["diverged"], rows["a"]["tasks"]) == (0, 3 * TASKS)


@pytest.mark.parametrize("with_column", [True, False])
def test_a_task_that_diverged_at_some_step_is_left_out_of_the_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], with_column: bool
) -> None:
    """Its last step may be finite again (an inf loss coming back to 3.9e36) or an accuracy
    that a NaN model still scores: the ``diverged`` column, or in a file without one a
    non-finite metric at some step, leaves it out of the pairs, as the evaluation did."""
    values = {seed: draws(seed, 0.8) for seed in (0, 1)}
    for seed in (0, 1):
        run(tmp_path, f"a{seed}", "a", seed, values[seed])
        folder = run(tmp_path, f"b{seed}", "b", seed, draws(50 + seed, 0.7))
        rows = (folder / "tasks.csv").read_text().splitlines()
        rows[0] += ",diverged" if with_column else ""
        tail = ",0" if with_column else ""
        rows[1:] = [row + tail for row in rows[1:]]
        # task 3 diverged: at step 0 (no column) or by the column, yet finite at its end
        bad = f"test,100,{seed},3,0,{'0.2,1' if with_column else 'inf'}"
        rows[1 + 2 * 3] = bad
        (folder / "tasks.csv").write_text("\n".join(rows) + "\n")
    b = rows_of(str(tmp_path), capsys=capsys)["b"]
    per_seed = []
    for seed in (0, 1):
        mine = draws(50 + seed, 0.7)
        pairs = enumerate(zip(values[seed], mine, strict=True))
        per_seed.append(statistics.fmean(m - a for t, (a, m) in pairs if t != 3))
    assert b["pairs"] == 2 and b["difference"] == pytest.approx(statistics.fmean(per_seed))
