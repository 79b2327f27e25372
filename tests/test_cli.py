"""End to end, as a user runs it: `metacli train` and `metacli test` in a subprocess."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from metacli.registry import GROUPS, available
from tests.conftest import REPO, TINY, options, read_metrics, read_summary, run_cli

RUN_FILES = (
    "summary.json",
    "metrics.jsonl",
    "metacli.log",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    ".hydra/hydra.yaml",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run shared by the checks below."""
    cwd = tmp_path_factory.mktemp("train")
    run_cli("train", *TINY, "seed=3", cwd=cwd)
    (run_dir,) = (cwd / "outputs" / "train").glob("*/*")
    return run_dir


def test_train_writes_a_complete_run_folder(trained: Path) -> None:
    for name in RUN_FILES:
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0, name
    date, clock = trained.parts[-2:]
    assert len(date) == 10 and len(clock.split("-")[-1]) == 6  # microseconds in the name
    config = yaml.safe_load((trained / ".hydra/config.yaml").read_text())
    assert config["seed"] == 3 and config["train"]["iterations"] == 20


def test_summary_holds_what_a_run_is_compared_by(trained: Path) -> None:
    summary = read_summary(trained)
    assert summary["status"] == "finished" and summary["command"] == "train"
    assert summary["groups"] == {
        "algo": "maml",
        "update": None,
        "task": "sinusoid",
        "model": "mlp",
        "device": "auto",
        "optim": "adam",
        "logger": "none",
        "experiment": None,
        "debug": "tiny",
    }
    assert summary["config"]["train"]["iterations"] == 20 and "seed" in summary["config"]
    assert summary["overrides"] == ["debug=tiny", "seed=3"] and summary["seed"] == 3
    assert summary["device"] == "cpu" and summary["torch_version"] == str(torch.__version__)
    assert "git_commit" in summary and summary["wall_time_s"] > 0
    assert summary["segments"] == 1 and summary["eval_time_s"] > 0
    assert summary["train_time_s"] + summary["eval_time_s"] < summary["wall_time_s"]
    assert summary["name"] is None and summary["tags"] == []
    assert summary["iterations"] == 20
    test = summary["test"]
    n, per_step = test["num_tasks"], test["per_step"]
    assert n == 16 and test["inner_steps"] == 3 and len(per_step["mean"]) == 4
    assert test["mean"] == per_step["mean"][-1]
    assert test["before_adaptation"]["mean"] == per_step["mean"][0]
    assert math.isclose(test["ci95"], 1.96 * test["std"] / math.sqrt(n))
    best = summary["best_val"]
    vals = [r for r in read_metrics(trained) if r["split"] == "val"]
    assert best["metric"] == min(r["metric"] for r in vals)


def test_metrics_jsonl_lines(trained: Path) -> None:
    records = read_metrics(trained, drop_timing=False)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    test = [r for r in records if r["split"] == "test"]
    assert [r["iteration"] for r in train] == [5, 10, 15, 20]
    assert [r["iteration"] for r in val] == [10, 20] and len(test) == 1
    for r in train:
        assert {"loss", "metric", "lr", "inner_lr", "it_per_s", "wall_time"} <= r.keys()
        assert r["lr"] == 0.001 and r["inner_lr"] == 0.01 and r["it_per_s"] > 0
    assert test[0]["metric"] == read_summary(trained)["test"]["mean"]
    log = (trained / "metacli.log").read_text()
    assert "iter 20/20" in log and "meta-test on 16 tasks" in log
    assert read_summary(trained)["batching"] == "stacked"  # what auto took for MAML on the MLP


def test_best_and_last_checkpoints_are_complete_dicts(trained: Path) -> None:
    last = torch.load(trained / "checkpoints/last.pt", weights_only=True)
    assert last["iteration"] == 20 and last["format"] == "metacli"
    for key in (
        "algorithm",
        "optimizer",
        "scheduler",
        "rng",
        "config",
        "overrides",
        "best_metric",
        "best_iteration",
    ):
        assert key in last
    assert set(last["rng"]) >= {"python", "torch", "train_tasks"}
    assert last["config"]["seed"] == 3 and last["overrides"] == ["debug=tiny", "seed=3"]
    best = torch.load(trained / "checkpoints/best.pt", weights_only=True)
    assert (
        best["iteration"]
        == best["best_iteration"]
        == read_summary(trained)["best_val"]["iteration"]
    )


def test_metacli_test_meta_tests_a_checkpoint_with_the_runs_config(
    trained: Path, tmp_path: Path
) -> None:
    ckpt = trained / "checkpoints/best.pt"
    run_cli("test", f"ckpt_path={ckpt}", cwd=tmp_path)
    (test_dir,) = (tmp_path / "outputs" / "test").glob("*/*")
    for name in ("summary.json", "metrics.jsonl", "metacli.log", ".hydra/config.yaml"):
        assert (test_dir / name).is_file(), name
    assert (test_dir / "checkpoints").is_dir()
    summary = read_summary(test_dir)
    # The run's own overrides were replayed: same tiny test set, same seed, same result.
    assert summary["seed"] == 3 and summary["groups"]["debug"] == "tiny"
    assert summary["test"]["mean"] == read_summary(trained)["test"]["mean"]
    # An explicit override wins over the replayed one.
    (tmp_path / "again").mkdir()
    run_cli(
        "test",
        f"ckpt_path={ckpt}",
        "test.num_tasks=5",
        "algo.test_inner_steps=1",
        cwd=tmp_path / "again",
    )
    (again,) = (tmp_path / "again" / "outputs" / "test").glob("*/*")
    test = read_summary(again)["test"]
    assert test["num_tasks"] == 5 and test["inner_steps"] == 1


@pytest.mark.slow  # the same as tests/test_sweeps.py's sweep, in the default folder
def test_multirun_jobs_get_their_own_numbered_folders(tmp_path: Path) -> None:
    run_cli(
        "train",
        "-m",
        *TINY,
        "train.iterations=4",
        "train.val_every=2",
        "algo=maml,fomaml",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    algos = [read_summary(sweep / j)["groups"]["algo"] for j in jobs]
    assert algos == ["maml", "fomaml"]
    assert all(read_summary(sweep / j)["status"] == "finished" for j in jobs)


# Bad overrides: tests/test_errors.py (the catalogue, in-process); this one as a user runs it,
# a failure inside the job (after Hydra made the folder, which is then removed).
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("train", *TINY, "device=cuda", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "device=cuda" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("outputs/train/*/*"))  # a config error makes no run folder


def test_help_lists_subcommands_quickly(tmp_path: Path) -> None:
    # Best of three, so a busy machine does not fail it: the point is that no torch is imported.
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        result = run_cli("--help", cwd=tmp_path)
        seconds.append(time.perf_counter() - start)
    assert "train" in result.stdout and "test" in result.stdout
    assert min(seconds) < 1.0
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, metacli.cli; print('torch' in sys.modules, 'hydra' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.split() == ["False", "False"]


def test_hydra_flags_work_per_subcommand(tmp_path: Path) -> None:
    result = run_cli("train", "--help", cwd=tmp_path)
    for group in ("algo", "task", "model", "device", "optim", "experiment", "debug"):
        offered = available(group) if group in GROUPS else options(group)  # (with plug-ins)
        assert f"{group}: {', '.join(offered)}" in result.stdout, group
    job = yaml.safe_load(run_cli("train", "algo=fomaml", "--cfg", "job", cwd=tmp_path).stdout)
    assert job["algo"]["name"] == "fomaml" and "hydra" not in job
    assert "Config search path" in run_cli("train", "--info", cwd=tmp_path).stdout
    assert run_cli("test", "--help", cwd=tmp_path).returncode == 0
    extra = tmp_path / "myconf" / "algo"
    extra.mkdir(parents=True)
    (extra / "mymaml.yaml").write_text("name: maml\ninner_lr: 0.5\ninner_steps: 1\n")
    job = yaml.safe_load(
        run_cli(
            "train",
            "--config-dir",
            str(tmp_path / "myconf"),
            "algo=mymaml",
            "--cfg",
            "job",
            cwd=tmp_path,
        ).stdout
    )
    assert job["algo"]["inner_lr"] == 0.5
    assert not (tmp_path / "outputs").exists()  # none of these flags starts a run


def test_unknown_command_and_no_command(tmp_path: Path) -> None:
    result = run_cli("fit", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown command 'fit'" in result.stderr
    assert run_cli(cwd=tmp_path, check=False).returncode == 2


def test_summary_json_is_valid_json_at_every_stage(trained: Path) -> None:
    json.loads((trained / "summary.json").read_text())
    assert not list(trained.rglob("*.tmp"))


@pytest.mark.slow
def test_default_train_learns_sinusoids_in_about_a_minute(tmp_path: Path) -> None:
    """What `make train` runs: the post-adaptation MSE far below the pre-adaptation MSE."""
    run_cli("train", cwd=tmp_path, timeout=600)
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    test = read_summary(run_dir)["test"]
    assert test["num_tasks"] == 600 and test["inner_steps"] == 10
    assert test["mean"] < 0.2 * test["before_adaptation"]["mean"]
    assert (
        test["mean"] + test["ci95"]
        < test["before_adaptation"]["mean"] - test["before_adaptation"]["ci95"]
    )


def tasks_table(run_dir: Path) -> list[dict[str, Any]]:
    """tasks.csv as rows of typed values."""
    rows = list(csv.DictReader((run_dir / "tasks.csv").open()))
    return [
        {
            **r,
            "iteration": int(r["iteration"]),
            "task": int(r["task"]),
            "step": int(r["step"]),
            "metric": float(r["metric"]),
        }
        for r in rows
    ]


def test_diverged_tasks_are_counted_and_the_metric_is_over_the_others(tmp_path: Path) -> None:
    """An evaluation step size of 0.5 makes some test tasks' inner loops overflow: the
    meta-test is the mean over the finite ones, as tasks.csv recomputes it."""
    printed = run_cli("train", *TINY, "algo.test_inner_lr=0.5", cwd=tmp_path).stdout
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    test = read_summary(run_dir)["test"]
    rows = [r for r in tasks_table(run_dir) if r["split"] == "test"]
    final = {r["task"]: r["metric"] for r in rows if r["step"] == test["inner_steps"]}
    by_task: dict[int, list[float]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["metric"])
    finite = [final[k] for k, values in by_task.items() if all(map(math.isfinite, values))]
    marked = {r["task"] for r in rows if r["diverged"] == "1"}
    assert marked == {k for k, values in by_task.items() if not all(map(math.isfinite, values))}
    assert len(final) == test["num_tasks"] == 16
    assert 0 < test["diverged_tasks"] == 16 - len(finite) < 16
    assert test["mean"] == pytest.approx(statistics.fmean(finite), rel=1e-12)
    assert not math.isfinite(test["raw_mean"])
    log = (run_dir / "metacli.log").read_text()
    assert f"on {len(finite)} of 16 tasks; {test['diverged_tasks']} diverged" in log
    # the final table says so too (its means are over the finite tasks)
    assert f"diverged tasks: {test['diverged_tasks']} of 16, left out of the means" in printed


def test_a_fully_diverged_validation_is_still_the_best_of_none(tmp_path: Path) -> None:
    # An evaluation step size of 1e3 makes every validation task's inner loop overflow
    # while training (inner_lr 0.01) stays finite: the first validation is kept as best.
    run_cli("train", *TINY, "algo.test_inner_lr=1000", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    vals = [r for r in read_metrics(run_dir) if r["split"] == "val"]
    assert vals and all(math.isnan(r["metric"]) for r in vals)
    assert all(r["diverged_tasks"] == r["num_tasks"] == 8 for r in vals)
    summary = read_summary(run_dir)
    assert summary["best_val"]["iteration"] == 10 and summary["best_val"]["diverged_tasks"] == 8
    assert summary["test"]["checkpoint"] == "best" and summary["test"]["diverged_tasks"] == 16
    assert (run_dir / "checkpoints" / "best.pt").exists()
    log = (run_dir / "metacli.log").read_text()
    assert "on 0 of 8 tasks; 8 diverged" in log and "on 0 of 16 tasks; 16 diverged" in log


def test_the_best_validation_has_the_fewest_diverged_tasks_then_the_best_metric() -> None:
    from metacli.evaluation import is_better

    nan, inf = math.nan, math.inf
    for higher in (True, False):
        assert is_better(higher, nan, 8, None, None)  # the first validation, whatever it holds
        assert is_better(higher, 9.0, 1, 1.0, 2) and not is_better(higher, 1.0, 2, 9.0, 1)
        assert is_better(higher, 2.0, 0, 1.0, 0) is higher
        assert not is_better(higher, nan, 0, 1.0, 0) and not is_better(higher, inf, 3, nan, 3)
        assert is_better(higher, 5.0, 3, nan, 3)  # a number beats none


def test_report_last_meta_tests_the_last_weights_besides_the_best(tmp_path: Path) -> None:
    run_cli("train", *TINY, "test.report_last=true", "train.val_every=5", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    summary = read_summary(run_dir)
    last, best = summary["test_last"], summary["test"]
    assert last["checkpoint_iteration"] == 20 and best["checkpoint"] == "best"
    splits = [r["split"] for r in read_metrics(run_dir)]
    assert splits.count("test_last") == 1 and splits.count("test") == 1
    # The same numbers as meta-testing each checkpoint on its own.
    for name, recorded in (("last", last), ("best", best)):
        out = tmp_path / name
        out.mkdir()
        run_cli("test", f"ckpt_path={run_dir}/checkpoints/{name}.pt", cwd=out)
        (test_dir,) = (out / "outputs" / "test").glob("*/*")
        assert read_summary(test_dir)["test"]["mean"] == pytest.approx(recorded["mean"], rel=1e-9)


@pytest.mark.parametrize("worker", [False, True])
def test_the_command_ends_fast_yet_runs_exit_handlers_and_waits_for_workers(
    tmp_path: Path, worker: bool
) -> None:
    """``entry`` skips the interpreter's teardown, not the exit handlers, the flush of the
    output, or a thread still at work."""
    code = (
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "from metacli.cli import entry\n"
        f"out = Path({str(tmp_path)!r})\n"
        "atexit.register(lambda: (out / 'handler').write_text('ran'))\n"
        f"if {worker}:\n"
        "    def work():\n"
        "        time.sleep(0.5)\n"
        "        (out / 'worker').write_text('done')\n"
        "    threading.Thread(target=work).start()\n"
        "sys.stdout.write('unflushed line')\n"
        "sys.argv = ['metacli', '--version']\n"
        "entry()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unflushed line") and "metacli " in result.stdout
    assert (tmp_path / "handler").read_text() == "ran"
    assert (tmp_path / "worker").exists() == worker


def test_a_run_resolves_its_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks before Hydra resolve the config; the job takes that, not its own."""
    from metacli import build, cli, precheck, run

    calls: list[int] = []
    original = build.resolve

    def counted(cfg: Any) -> Any:
        calls.append(1)
        return original(cfg)

    for module in (build, precheck, run):
        monkeypatch.setattr(module, "resolve", counted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["metacli"])
    cli.main(["train", *TINY, "device=cpu", "hydra.run.dir=run"])
    assert read_summary(tmp_path / "run")["status"] == "finished"
    assert len(calls) == 1
