"""Checkpoints survive kills, resume continues bit for bit, seeds fix every number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metacli.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from metacli.errors import MetacliError
from tests.conftest import TINY, read_metrics, read_summary, run_cli


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
    run_cli("train", "resume=half", "train.iterations=40", cwd=tmp_path)
    full, resumed = tmp_path / "full", tmp_path / "half"
    assert_same_params(params(full), params(resumed))
    assert_same_params(params(full, "best"), params(resumed, "best"))
    assert read_metrics(full) == read_metrics(resumed)
    # The resumed run kept its first half (all but the old meta-test line) and continued.
    assert read_metrics(resumed)[: len(first_half) - 1] == first_half[:-1]
    summary = read_summary(resumed)
    assert summary["status"] == "finished" and summary["resumed_from_iteration"] == 20
    assert summary["test"] == read_summary(full)["test"]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_cli("train", *TINY, f"seed={seed}", f"hydra.run.dir={name}", cwd=tmp_path)
    a, b, c = (read_metrics(tmp_path / n) for n in "abc")
    assert a == b
    assert a != c
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))


def test_validation_and_test_tasks_do_not_depend_on_the_algorithm(tmp_path: Path) -> None:
    """Paired comparisons: with the same seed, MAML and FOMAML meet the same tasks."""
    for algo in ("maml", "fomaml"):
        run_cli(
            "train",
            *TINY,
            f"algo={algo}",
            "train.iterations=0",
            f"hydra.run.dir={algo}",
            cwd=tmp_path,
        )
    # With no training both start from the same seeded initialisation, so the
    # before-adaptation numbers (which do not depend on the algorithm) must agree.
    a, b = (read_summary(tmp_path / n)["test"] for n in ("maml", "fomaml"))
    assert a["before_adaptation"] == b["before_adaptation"]


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
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "interrupted"
    stopped_at = load_checkpoint(last)["iteration"]
    assert stopped_at >= 50
    assert all(r["iteration"] <= stopped_at for r in read_metrics(tmp_path / "run"))
    run_cli("train", "resume=run", f"train.iterations={stopped_at + 10}", cwd=tmp_path)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["iterations"] == stopped_at + 10


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
    with pytest.raises(MetacliError, match="Cannot read checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(MetacliError, match="not a metacli checkpoint"):
        load_checkpoint(foreign)
    result = run_cli("test", f"ckpt_path={bad}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Cannot read checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("train", f"resume={tmp_path / 'nothing'}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "checkpoints/last.pt" in result.stderr
