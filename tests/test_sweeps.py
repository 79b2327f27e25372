"""Sweeps (multirun, launchers, skip_finished, Optuna), `metacli compare` and `metacli plot`.

Every sweep here is a real `metacli train -m` in a subprocess with tiny runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from metacli import extras, tables
from metacli.errors import MetacliError

from .conftest import read_summary, run_cli

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = ("train", "-m", "debug=tiny", "algo=maml,fomaml", "seed=0,1")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-config x 2-seed sweep, basic launcher."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli(*SWEEP, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert "sweep: 4 jobs, 0 not finished" in result.stdout
    return root / "sweep"


def run_sweep(
    cwd: Path, *overrides: str, check: bool = True
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``metacli train -m debug=tiny OVERRIDES`` into ``cwd/sweep``."""
    sweep = cwd / "sweep"
    mode = () if any(o.startswith("hparams_search=") for o in overrides) else ("-m",)
    args = ("train", *mode, "debug=tiny", *overrides, f"hydra.sweep.dir={sweep}")
    return sweep, run_cli(*args, cwd=cwd, check=check)


def compare_json(*args: str, cwd: Path) -> dict:
    return json.loads(run_cli("compare", *args, "--format", "json", cwd=cwd).stdout)


def test_multirun_runs_every_combination_into_one_folder(sweep: Path) -> None:
    jobs = {int(p.name): read_summary(p) for p in sweep.iterdir() if p.name.isdigit()}
    assert sorted(jobs) == [0, 1, 2, 3]
    combos = {(s["groups"]["algo"], s["seed"]) for s in jobs.values()}
    assert combos == {("maml", 0), ("maml", 1), ("fomaml", 0), ("fomaml", 1)}
    for summary in jobs.values():
        assert summary["status"] == "finished"
        # the train entry point returns optimized_metric (val: the best validation metric)
        assert summary["objective"] == summary["best_val"]["metric"]
    # startup_s is each job's own: the first includes the process's imports, the next
    # ones (the same process, the basic launcher) only their own building
    assert all(jobs[j]["startup_s"] < jobs[0]["startup_s"] for j in (1, 2, 3))


def test_compare_aggregates_over_seeds_and_matches_the_summaries(sweep: Path) -> None:
    report = compare_json(str(sweep), cwd=sweep.parent)
    assert report["unfinished"] == []
    rows = {row["algo"]: row for row in report["rows"]}
    assert set(rows) == {"maml", "fomaml"}
    for algo, row in rows.items():
        summaries = [read_summary(Path(r)) for r in row["runs"]]
        assert {s["groups"]["algo"] for s in summaries} == {algo}
        assert sorted(s["seed"] for s in summaries) == [0, 1]
        tests = [s["test"]["mean"] for s in summaries]
        assert row["seeds"] == row["finite_seeds"] == 2
        assert row["metric"] == pytest.approx(statistics.fmean(tests), abs=1e-12)
        # 95% CI across 2 seeds: t(0.975, df=1) = 12.706 times the standard error
        assert row["ci95_seeds"] == pytest.approx(
            12.7062047 * statistics.stdev(tests) / math.sqrt(2)
        )
        within = [s["test"]["ci95"] for s in summaries]  # each seed's over its tasks
        assert row["ci95_tasks"] == pytest.approx(statistics.fmean(within))
        vals = [s["best_val"]["metric"] for s in summaries]
        assert row["best_val"] == pytest.approx(statistics.fmean(vals))
        assert row["iterations"] == 20
        assert row["wall_time_s"] == pytest.approx(
            statistics.fmean(s["wall_time_s"] for s in summaries)
        )
    # mse: lower is better, so the default order is ascending
    metrics = [row["metric"] for row in report["rows"]]
    assert metrics == sorted(metrics)


def test_compare_formats_print_the_same_numbers(sweep: Path) -> None:
    rows = compare_json(str(sweep), cwd=sweep.parent)["rows"]
    table = run_cli("compare", str(sweep), cwd=sweep.parent).stdout
    markdown = run_cli("compare", str(sweep), "--format", "markdown", cwd=sweep.parent).stdout
    text = run_cli("compare", str(sweep), "--format", "csv", cwd=sweep.parent).stdout
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 2
    assert markdown.splitlines()[1].startswith("|---|")
    for row in rows:
        for shown in (f"{row['metric']:.4f}", f"{row['ci95_seeds']:.4f}"):
            assert shown in table and shown in markdown
        line = next(p for p in parsed if p["algo"] == row["algo"])
        assert float(line["metric"]) == pytest.approx(row["metric"], rel=1e-12)
        assert int(line["seeds"]) == 2


def test_compare_group_by_filter_sort_and_metric(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = sweep.parent
    everything = compare_json(str(sweep), "--group-by", "task", cwd=cwd)["rows"]
    # maml and fomaml pooled by task: seeds 0 and 1 twice each count as 2 distinct seeds;
    # the latest run of each is used and the others are reported, not pooled
    [row] = everything
    assert row["seeds"] == 2 and len(row["duplicate_seed_runs"]) == 2
    used = [read_summary(Path(r)) for r in row["runs"]]
    assert sorted(s["seed"] for s in used) == [0, 1]
    assert row["metric"] == pytest.approx(statistics.fmean(s["test"]["mean"] for s in used))
    assert tables.main([str(sweep), "--group-by", "task"]) == 0
    assert "seeds run more than once (task=sinusoid)" in capsys.readouterr().out
    only = compare_json(str(sweep), "--filter", "algo=fomaml", cwd=cwd)["rows"]
    assert [r["algo"] for r in only] == ["fomaml"]
    seed0 = compare_json(str(sweep), "--filter", "algo=maml", "--filter", "seed=0", cwd=cwd)
    [row] = seed0["rows"]
    assert row["seeds"] == 1 and row["metric"] == read_summary(sweep / "0")["test"]["mean"]
    by_val = compare_json(str(sweep), "--metric", "val", "--sort", "algo", cwd=cwd)["rows"]
    assert [r["algo"] for r in by_val] == ["fomaml", "maml"]
    for row in by_val:
        assert row["metric"] == pytest.approx(row["best_val"])
    bad = run_cli("compare", str(sweep), "--sort", "nosuch", cwd=cwd, check=False)
    assert bad.returncode == 2 and "--sort nosuch: no such column" in bad.stderr


def test_one_seed_uses_the_runs_own_interval_and_broken_runs_are_listed(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "outputs"
    tree.mkdir()
    single = tree / "single"
    subprocess.run(["cp", "-r", str(sweep / "0"), str(single)], check=True)
    crashed = tree / "crashed"
    crashed.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    summary = {**read_summary(single), "status": "running", "pid": dead.pid}
    summary["host"] = os.uname().nodename
    (crashed / "summary.json").write_text(json.dumps(summary))
    torn = tree / "torn"
    torn.mkdir()
    (torn / "summary.json").write_text('{"status": "fini')
    failed = tree / "failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    hidden = tree / "single" / ".replaced" / "old"
    hidden.mkdir(parents=True)
    (hidden / "summary.json").write_text(json.dumps(read_summary(single)))
    report = compare_json(str(tree), cwd=tmp_path)
    [row] = report["rows"]
    assert row["seeds"] == 1 and row["ci95_seeds"] is None and row["sd_seeds"] is None
    assert row["ci95_tasks"] == read_summary(single)["test"]["ci95"]
    statuses = {Path(u["folder"]).name: u["status"] for u in report["unfinished"]}
    assert statuses == {"crashed": "crashed", "torn": "unreadable", "failed": "failed"}
    table = run_cli("compare", str(tree), cwd=tmp_path).stdout
    assert "3 run(s) not finished (1 crashed, 1 failed, 1 unreadable); --all lists them" in table
    assert "(boom)" not in table  # failed runs are hidden by default
    assert tables.main([str(tree), "--all"]) == 0
    listed = capsys.readouterr().out
    assert "failed: " in listed and "(boom)" in listed


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # (a config a check refuses stops the sweep before any job: tests/test_errors.py)
    _, result = run_sweep(tmp_path, "optim.lr=1e30,0.001", check=False)
    assert result.returncode == 1
    assert "sweep: 2 jobs, 1 not finished" in result.stdout
    assert "job 0 failed: The meta-loss (nan) is not finite at iteration 2" in result.stdout
    assert read_summary(tmp_path / "sweep" / "0")["status"] == "failed"
    assert read_summary(tmp_path / "sweep" / "1")["status"] == "finished"
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow  # end to end, several CLI runs: make test-full
def test_skip_finished_skips_resumes_and_never_overwrites(tmp_path: Path) -> None:
    sweep, _ = run_sweep(tmp_path, "seed=0,1")
    before = {i: (sweep / str(i) / "metrics.jsonl").read_bytes() for i in (0, 1)}
    # job 1 was interrupted: skip_finished resumes it from its last checkpoint
    summary = read_summary(sweep / "1")
    (sweep / "1" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    _, result = run_sweep(tmp_path, "seed=0,1", "skip_finished=true")
    assert "skipped (finished before)" in result.stdout
    assert (sweep / "0" / "metrics.jsonl").read_bytes() == before[0]
    resumed = read_summary(sweep / "1")
    assert resumed["status"] == "finished" and resumed["resumed_from_iteration"] == 20
    # another config in the same folders: the earlier runs are moved aside, not lost
    run_sweep(tmp_path, "seed=0", "train.iterations=10", "skip_finished=true")
    assert read_summary(sweep / "0")["iterations"] == 10
    [archived] = (sweep / "0" / ".replaced").iterdir()
    assert (archived / "metrics.jsonl").read_bytes() == before[0]
    assert read_summary(archived)["iterations"] == 20


@pytest.mark.slow
@pytest.mark.skipif(not extras.installed("joblib"), reason="hydra-joblib-launcher not installed")
def test_joblib_launcher_runs_two_jobs_in_parallel_without_oversubscribing(
    tmp_path: Path,
) -> None:
    sweep, _ = run_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1")
    jobs = [read_summary(sweep / str(i)) for i in (0, 1)]
    assert [j["status"] for j in jobs] == ["finished", "finished"]
    assert jobs[0]["pid"] != jobs[1]["pid"]  # separate worker processes
    cores = len(os.sched_getaffinity(0))
    assert all(j["threads"] == max(1, cores // 2) for j in jobs)
    assert all(j["run_dir"] == str(sweep / str(i)) for i, j in enumerate(jobs))
    assert len(set((sweep / "0" / "metacli.log").read_text().splitlines())) > 3


@pytest.mark.slow
@pytest.mark.skipif(not extras.installed("submitit"), reason="hydra-submitit-launcher missing")
def test_submitit_local_launcher(tmp_path: Path) -> None:
    sweep, result = run_sweep(tmp_path, "hydra/launcher=submitit_local", "seed=0,1")
    assert "sweep: 2 jobs, 0 not finished" in result.stdout
    jobs = [read_summary(sweep / str(i)) for i in (0, 1)]
    assert [j["status"] for j in jobs] == ["finished", "finished"]
    assert all(j["threads"] == 1 for j in jobs)  # cpus_per_task: 1


@pytest.mark.slow
@pytest.mark.skipif(not extras.installed("optuna"), reason="hydra-optuna-sweeper not installed")
def test_optuna_search_preset(tmp_path: Path) -> None:
    sweep, result = run_sweep(tmp_path, "hparams_search=maml_sinusoid", "hydra.sweeper.n_trials=3")
    assert "Best value:" in result.stdout + result.stderr
    jobs = [read_summary(sweep / str(i)) for i in range(3)]
    best = min(j["objective"] for j in jobs)
    assert f"Best value: {best}" in result.stdout + result.stderr
    lrs = {j["config"]["algo"]["inner_lr"] for j in jobs}
    assert len(lrs) == 3 and all(0.001 <= lr <= 0.1 for lr in lrs)


@pytest.mark.skipif(not extras.installed("optuna"), reason="hydra-optuna-sweeper not installed")
def test_a_range_is_checked_against_the_sweeper() -> None:
    """interval(...) is for a search sweeper: refused before the basic sweeper's traceback,
    accepted with Optuna, chosen by -m with hydra/sweeper or by a search config alone."""
    from metacli.composition import multirun
    from metacli.precheck import check_sampled_sweep

    lr = "optim.lr=interval(0.001,0.1)"
    check_sampled_sweep("train", ["-m", lr, "hydra/sweeper=optuna"])
    check_sampled_sweep("train", ["hparams_search=maml_sinusoid", lr])
    with pytest.raises(MetacliError, match=r"is a range to sample.*optim.lr=0.001,0.01,0.1"):
        check_sampled_sweep("train", ["-m", lr])
    assert multirun(["hparams_search=maml_sinusoid"]) and not multirun(["hparams_search=null"])


def test_overrides_on_both_sides_of_m_and_a_glob_sweep(tmp_path: Path) -> None:
    """``a=1 -m b=1,2``: Hydra's parser takes the overrides as one run of arguments and
    stopped at b=1,2 ("unrecognized arguments"); glob() needed Hydra's config loader."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "debug=tiny", "-m", "algo=glob([fo*,rep*])", "seed=0,1",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert "sweep: 4 jobs, 0 not finished" in result.stdout
    combos = {(read_summary(sweep / str(i))["groups"]["algo"], i % 2) for i in range(4)}
    assert combos == {("fomaml", 0), ("fomaml", 1), ("reptile", 0), ("reptile", 1)}


def test_a_missing_plugin_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extras.EXTRAS, "joblib", ("no_such_module.launcher", "the launcher"))
    with pytest.raises(MetacliError, match=r"pip install 'metacli\[joblib\]'"):
        extras.check_overrides(["debug=tiny", "hydra/launcher=joblib"])
    extras.check_overrides(["hydra/launcher=basic", "logger=none", "hparams_search=null"])


@pytest.mark.slow  # end to end, several CLI runs: make test-full
def test_plots_are_written(sweep: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    figure = tmp_path / "val.png"
    run_cli("compare", str(sweep), "--plot", str(figure), cwd=tmp_path)
    assert figure.read_bytes().startswith(PNG) and figure.stat().st_size > 10_000
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(sweep / "0"), str(run)], check=True)
    result = run_cli("plot", str(run), cwd=tmp_path)
    for name in ("learning_curves.png", "inner_steps.png", "adaptation.png"):
        assert f"wrote {run / name}" in result.stdout
        assert (run / name).read_bytes().startswith(PNG) and (run / name).stat().st_size > 10_000
    result = run_cli("plot", str(sweep), cwd=tmp_path)
    assert f"wrote {sweep / 'comparison.png'}" in result.stdout
    assert (sweep / "comparison.png").read_bytes().startswith(PNG)
    (tmp_path / "empty").mkdir()
    bad = run_cli("plot", str(tmp_path / "empty"), cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "is neither a run folder" in bad.stderr


@pytest.mark.slow  # end to end, several CLI runs: make test-full
@pytest.mark.skipif(not extras.installed("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_logger(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_cli("train", "debug=tiny", "logger=tensorboard", f"hydra.run.dir={run}", cwd=tmp_path)
    tags: dict[str, list[float]] = {}
    for events in (run / "tensorboard").rglob("events.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags[tag] = [e.value for e in accumulator.Scalars(tag)]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["metric"] for r in lines if r["split"] == "val"]
    assert tags["val/metric"] == pytest.approx(val)
    assert tags["hparam/test/metric"] == pytest.approx([read_summary(run)["test"]["mean"]])


@pytest.mark.skipif(not extras.installed("mlflow"), reason="mlflow not installed (optional)")
def test_mlflow_logger(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    run_cli(
        "train",
        "debug=tiny",
        "logger=mlflow",
        f"logger.tracking_uri={uri}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("metacli")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["algo.name"] == "maml"
    assert found.data.metrics["test_metric"] == pytest.approx(read_summary(run)["test"]["mean"])


@pytest.mark.slow  # end to end, several CLI runs: make test-full
def test_sweeping_a_key_that_only_some_algorithms_have(tmp_path: Path) -> None:
    """The issue's example: algo=maml,anil,protonet with algo.inner_lr=0.1,0.4."""
    small = ("task=synthetic", "model=conv4", "model.filters=4", "algo=maml,protonet")
    sweep, result = run_sweep(tmp_path, *small, "algo.inner_lr=0.1,0.4")
    assert "algo.inner_lr is not a setting of algo=protonet" in result.stderr
    assert "applying it as ++algo.inner_lr=0.1,0.4" in result.stderr
    assert "sweep: 4 jobs, 0 not finished" in result.stdout
    jobs = [read_summary(sweep / str(i)) for i in range(4)]
    # summary.json records what ran: ProtoNet's config has no inner_lr, the overrides do.
    combos = {(j["groups"]["algo"], j["config"]["algo"].get("inner_lr")) for j in jobs}
    assert combos == {("maml", 0.1), ("maml", 0.4), ("protonet", None)}
    swept = {o for j in jobs if j["groups"]["algo"] == "protonet" for o in j["overrides"]}
    assert {"++algo.inner_lr=0.1", "++algo.inner_lr=0.4"} <= swept
    protonet = next(i for i, j in enumerate(jobs) if j["groups"]["algo"] == "protonet")
    log = (sweep / str(protonet) / "metacli.log").read_text()
    assert "algo.inner_lr does not apply to algo=protonet; ignored" in log
    # ++algo.inner_lrr (no option has it) is an error: tests/test_errors.py
    typo = run_cli(
        "train", "-m", "debug=tiny", *small, "algo.inner_lrr=0.1", cwd=tmp_path, check=False
    )
    assert typo.returncode != 0 and "inner_lrr" in typo.stdout + typo.stderr


def test_ctrl_c_in_a_sweep_prints_its_table_and_the_command_that_continues_it(
    tmp_path: Path,
) -> None:
    import shlex
    import signal
    import time

    sweep = tmp_path / "sweep"
    args = ["debug=tiny", "train.iterations=2000", "train.val_every=100", "seed=0,1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "metacli", "train", "-m", *args, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    last = sweep / "0" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in output, output
    assert "sweep: 2 jobs, 2 not finished" in output, output
    assert "1 of the sweep's jobs never started" in output
    assert read_summary(sweep / "0")["status"] == "interrupted" and not (sweep / "1").exists()
    (line,) = [x for x in output.splitlines() if x.startswith("Continue the sweep with: ")]
    command = shlex.split(line.removeprefix("Continue the sweep with: "))
    assert command[:3] == ["metacli", "train", "-m"] and "skip_finished=true" in command
    run_cli(*command[1:], cwd=tmp_path)  # job 0 resumed from its checkpoint, job 1 run
    jobs = [read_summary(sweep / str(i)) for i in (0, 1)]
    assert [j["status"] for j in jobs] == ["finished", "finished"]
    assert jobs[0]["resumed_from_iteration"] > 0 and jobs[0]["iterations"] == 2000
    assert "resumed_from_iteration" not in jobs[1] and jobs[1]["seed"] == 1


def test_the_sweep_table_says_crashed_for_a_job_whose_process_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datetime as dt
    import platform

    from metacli import sweep as sweep_module

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for job, status in (("0", "finished"), ("1", "running")):
        (tmp_path / job).mkdir()
        summary = {"status": status, "overrides": [f"seed={job}"], "pid": dead.pid}
        (tmp_path / job / "summary.json").write_text(
            json.dumps({**summary, "host": platform.node(), "objective": 0.5})
        )
    started = dt.datetime.now().astimezone()
    assert sweep_module.print_table(tmp_path, started) == 1
    out = capsys.readouterr().out
    assert "crashed" in out and "running" not in out
