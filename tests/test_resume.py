"""Checkpoints survive kills, resume continues bit for bit, seeds fix every number."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metacli.checkpoint import load_checkpoint, save_checkpoint
from metacli.errors import MetacliError
from metacli.files import atomic_write
from tests import textdata
from tests.conftest import TINY, read_metrics, read_summary, run_cli
from tests.textdata import materialize


def params(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)["algorithm"]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    common = (*TINY, "train.val_every=10", "train.log_every=5", "optim=sgd")
    run_cli("train", *common, "train.iterations=40", "hydra.run.dir=full", cwd=tmp_path)
    run_cli("train", *common, "train.iterations=20", "hydra.run.dir=half", cwd=tmp_path)
    first_half = read_metrics(tmp_path / "half")
    before = read_summary(tmp_path / "half")
    started = time.perf_counter()
    run_cli("train", "resume=half", "train.iterations=40", cwd=tmp_path)
    resumed_in = time.perf_counter() - started
    full, resumed = tmp_path / "full", tmp_path / "half"
    assert_same_params(params(full), params(resumed))
    assert_same_params(params(full, "best"), params(resumed, "best"))
    # The resumed run kept its first half, the meta-test that ended it included, and
    # continued with the uninterrupted run's lines.
    assert read_metrics(resumed)[: len(first_half)] == first_half
    assert first_half[-1]["split"] == "test" and first_half[-1]["iteration"] == 20
    assert read_metrics(full) == [r for r in read_metrics(resumed) if r != first_half[-1]]
    summary = read_summary(resumed)
    assert summary["status"] == "finished" and summary["resumed_from_iteration"] == 20
    assert summary["test"] == read_summary(full)["test"]
    # times over both sessions: the wall time adds this session's to the first one's
    assert before["segments"] == 1 and summary["segments"] == 2
    assert before["wall_time_s"] < summary["wall_time_s"] < before["wall_time_s"] + resumed_in
    assert summary["train_time_s"] > before["train_time_s"]
    assert summary["eval_time_s"] > before["eval_time_s"]
    assert summary["train_time_s"] + summary["eval_time_s"] < summary["wall_time_s"]
    assert summary["it_per_s"] == pytest.approx(40 / summary["train_time_s"])


def test_validation_and_test_tasks_do_not_depend_on_the_algorithm() -> None:
    """Paired comparisons: with the same seed, MAML and FOMAML meet the same tasks."""
    from metacli.build import build
    from metacli.evaluation import evaluate
    from tests.conftest import compose_config

    before = {}
    for algo in ("maml", "fomaml"):
        c = build(compose_config(*TINY, f"algo={algo}", "device=cpu"))
        # Untrained, both start from the same seeded initialisation, so the
        # before-adaptation numbers (which do not depend on the algorithm) must agree.
        before[algo] = evaluate(c, "test", 16, 8).as_dict()["before_adaptation"]
    assert before["maml"] == before["fomaml"]


def test_interrupt_writes_last_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metacli",
            "train",
            *TINY,
            "train.iterations=1000000",
            "train.val_every=50",
            "train.log_every=50",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "resume=" in output and "Traceback" not in output
    assert "SIGINT received: stopping after this iteration" in output  # acknowledged at once
    lines = output.splitlines()
    assert f"Run folder: {tmp_path / 'run'}" in lines[0] and "Overrides: debug=tiny" in lines[1]
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "interrupted"
    interrupted_wall = summary["wall_time_s"]
    assert summary["segments"] == 1 and interrupted_wall > 0
    stopped_at = load_checkpoint(last)["iteration"]
    assert stopped_at >= 50
    assert all(r["iteration"] <= stopped_at for r in read_metrics(tmp_path / "run"))
    run_cli("train", "resume=run", f"train.iterations={stopped_at + 10}", cwd=tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["iterations"] == stopped_at + 10
    assert summary["segments"] == 2 and summary["wall_time_s"] > interrupted_wall


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(target, {"format": "metacli", "iteration": 1})

    def crash(handle: object) -> None:
        handle.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert load_checkpoint(target)["iteration"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MetacliError, match="Cannot read the checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(MetacliError, match="not a metacli checkpoint"):
        load_checkpoint(foreign)
    result = run_cli("test", f"ckpt_path={bad}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Cannot read the checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("train", f"resume={tmp_path / 'nothing'}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "checkpoints/last.pt" in result.stderr


def test_a_run_written_before_the_engine_is_meta_tested_by_the_command(tmp_path: Path) -> None:
    """tests/data/v1_runs/metasgd: a 10-iteration Meta-SGD run written by metacli at
    bbc4d5d (checkpoint format 1: learned rates on the algorithm, one optimizer group).
    Its checkpoints are kept as text (tests/textdata.py) and written back as the .pt file
    here; its best.pt was byte-identical to last.pt (its best weights were its last), so
    only last.pt is kept."""
    run = materialize(Path(__file__).parent / "data" / "v1_runs" / "metasgd", tmp_path / "metasgd")
    before = read_summary(run)["test"]
    tested = run_cli(
        "test", f"ckpt_path={run}/checkpoints/last.pt", "hydra.run.dir=t", cwd=tmp_path
    )
    assert "Traceback" not in tested.stderr
    assert read_summary(tmp_path / "t")["test"]["mean"] == pytest.approx(before["mean"], rel=1e-6)


def test_a_mamlpp_sinusoid_run_made_before_the_refusal_is_tested_and_resumed(
    tmp_path: Path,
) -> None:
    """New MAML++ runs with learned rates on a regression task are refused
    (docs/defaults.md); one made before (tests/data/v1_runs/mamlpp, at bbc4d5d) is
    meta-tested (and resumed) as it was."""
    run = materialize(Path(__file__).parent / "data" / "v1_runs" / "mamlpp", tmp_path / "mamlpp")
    tested = run_cli(
        "test", f"ckpt_path={run}/checkpoints/last.pt", "hydra.run.dir=t", cwd=tmp_path
    )
    assert read_summary(tmp_path / "t")["status"] == "finished", tested.stderr
    from metacli.build import resolve
    from metacli.precheck import check_new_run
    from tests.conftest import compose_config

    check_new_run(resolve(compose_config("algo=mamlpp")), "train", resuming=True)  # no error
    refused = run_cli("train", "debug=tiny", "algo=mamlpp", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "algo.on_regression=true" in refused.stderr


@pytest.mark.parametrize("algo", ["metasgd", "mamlpp"])
def test_runs_written_before_the_engine_resume_as_they_did(algo: str, tmp_path: Path) -> None:
    """tests/data/v1_runs: a 10-iteration run (checkpoint format 1, `debug=tiny algo=<algo>
    device=cpu train.iterations=10 train.val_every=5`) and the parameters and meta-test of
    that run resumed to 20 iterations, both written by metacli at bbc4d5d. Resumed here by
    the same functions as `metacli train resume=...` (the command itself: the test above)."""
    from omegaconf import OmegaConf

    from metacli.build import build
    from metacli.checkpoint import restore
    from metacli.evaluation import evaluate
    from metacli.loop import meta_train
    from tests.conftest import compose_config
    from tests.test_engine import Recorder

    data = Path(__file__).parent / "data" / "v1_runs"
    expected = textdata.read(data / f"{algo}_resumed.json")
    overrides = [str(o) for o in OmegaConf.load(data / algo / ".hydra" / "overrides.yaml")]
    c = build(compose_config(*overrides, "train.iterations=20"))
    last = materialize(data / algo, tmp_path / algo) / "checkpoints" / "last.pt"
    state = restore(c, load_checkpoint(last), str(last))
    assert state.iteration == 10
    meta_train(c, Recorder(), state)
    ours = c.algorithm.state_dict()
    assert len(ours) == len(expected["algorithm"])
    for key, value in expected["algorithm"].items():
        key = key.replace("learning_rates.", "rule.learning_rates.").replace(
            "step_lrs.", "rule.learning_rates."
        )
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-7)
    assert [g["name"] for g in c.optimizer.param_groups] == ["model", "update"]
    assert expected["test"]["checkpoint_iteration"] == 20  # its best weights were the last
    result = evaluate(c, "test", c.run.test.num_tasks, c.run.test.batch_size)
    assert result.final == pytest.approx(expected["test"]["mean"], rel=1e-4)


def test_kill_9_at_any_instant_resumes_to_the_same_lines(tmp_path: Path) -> None:
    """kill -9 mid-run (checkpoints every 10 iterations, train lines every 7: the stop falls
    inside a line's window), then resume: every metrics.jsonl line equals the
    uninterrupted run's, the summed train lines included."""
    common = (
        *TINY,
        "train.iterations=300",
        "train.val_every=10",
        "train.log_every=7",
        "val.num_tasks=2",
        "threads=1",
    )
    run_cli("train", *common, "hydra.run.dir=full", cwd=tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "metacli", "train", *common, "hydra.run.dir=killed"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last.exists() and load_checkpoint(last)["iteration"] >= 30:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    stopped = load_checkpoint(last)["iteration"]
    assert 30 <= stopped < 300, "the run ended before the kill: lengthen it"
    assert read_summary(tmp_path / "killed")["status"] == "running"  # what kill -9 leaves
    run_cli("train", "resume=killed", cwd=tmp_path)
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "full")


def test_extending_a_finished_run_keeps_its_meta_tests(tmp_path: Path) -> None:
    run_cli("train", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    first = read_summary(tmp_path / "run")
    first_lines = [r for r in read_metrics(tmp_path / "run") if r["split"] == "test"]
    run_cli("train", "resume=run", "train.iterations=30", cwd=tmp_path)
    run_cli("train", "resume=run", "train.iterations=40", cwd=tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["iterations"] == 40 and summary["test"]["checkpoint_iteration"] > 20
    history = summary["earlier_tests"]
    assert [t["iteration"] for t in history] == [20, 30]
    assert history[0]["test"] == first["test"] and history[0]["finished_at"] == first["finished_at"]
    tests = [r for r in read_metrics(tmp_path / "run") if r["split"] == "test"]
    assert [r["iteration"] for r in tests] == [20, 30, 40] and tests[0] == first_lines[0]
    with (tmp_path / "run" / "tasks.csv").open() as handle:
        tested = {int(r["iteration"]) for r in csv.DictReader(handle) if r["split"] == "test"}
    assert tested == {20, 30, 40}


def test_a_run_whose_only_checkpoint_is_best_pt_resumes_from_it(tmp_path: Path) -> None:
    """A full disk can stop a run before its first last.pt, after best.pt: best.pt holds
    the whole state too, so the run continues from it (and metacli test reads it)."""
    run_cli("train", *TINY, "train.iterations=40", "hydra.run.dir=full", cwd=tmp_path)
    run_cli("train", *TINY, "train.iterations=10", "hydra.run.dir=run", cwd=tmp_path)
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()
    result = run_cli("train", "resume=run", "train.iterations=40", cwd=tmp_path)
    assert "no checkpoints/last.pt: resuming from best.pt (iteration 10)" in (
        result.stdout + result.stderr
    )
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["resumed_from_iteration"] == 10
    assert_same_params(params(tmp_path / "full"), params(tmp_path / "run"))


def test_a_run_folder_travels_paths_and_genotype_with_it(tmp_path: Path) -> None:
    """A relative data.root is recorded as the run resolved it, and model=genotype's
    genotype.json is kept in the run folder: after the search folder is gone, the run is
    tested and resumed from another directory, and a failed test leaves no folder."""
    import shutil

    from tests.test_image_folder import make

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    make(here / "images")
    search = here / "search"
    search.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "genotype.json", search / "genotype.json")
    images = ("task=image_folder", "task.ways=2", "task.shots=1", "task.queries=2")
    run_cli(
        "train",
        *TINY,
        *images,
        "task.image_size=8",
        "task.ratios=[0.6,0.2,0.2]",
        "data.root=images",
        "model=genotype",
        "model.genotype=search",
        "hydra.run.dir=run",
        cwd=here,
    )
    run = here / "run"
    summary = read_summary(run)
    assert summary["config"]["data"]["root"] == str(here / "images")
    assert f"data.root={here / 'images'}" in summary["overrides"]
    assert json.loads((run / "genotype.json").read_text()) == json.loads(
        (Path(__file__).parent / "data" / "genotype.json").read_text()
    )
    shutil.rmtree(search)
    elsewhere.mkdir()
    tested = run_cli("test", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", cwd=elsewhere)
    assert "Traceback" not in tested.stdout + tested.stderr
    run_cli("train", f"resume={run}", "train.iterations=30", cwd=elsewhere)
    assert read_summary(run)["status"] == "finished" and read_summary(run)["iterations"] == 30
    (here / "images").rename(here / "moved")  # the data gone: the test fails, cleanly
    shutil.rmtree(elsewhere)
    elsewhere.mkdir()
    failed = run_cli(
        "test", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", cwd=elsewhere, check=False
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stdout + failed.stderr
    assert not list(elsewhere.iterdir())  # no outputs/test/ left behind
