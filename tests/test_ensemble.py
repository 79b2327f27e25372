"""test.ensemble_top_k: MAML++'s meta-test of the mean prediction of its best validation
checkpoints (HowToTrainYourMAMLPytorch, ``evaluated_test_set_using_the_best_models``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from metacli.build import build
from metacli.checkpoint import LoopState, components_from
from metacli.evaluation import top_name
from metacli.loop import keep_top
from metacli.tasks.base import split_generator
from tests.conftest import TINY, compose_config, read_metrics, read_summary, run_cli


class Memory:
    """A Recorder of checkpoint names only."""

    root = Path(".")

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.removed: list[str] = []

    def log_metrics(self, record: dict[str, Any]) -> None: ...

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        assert checkpoint["top"] is not None
        self.saved.append(name)

    def remove_checkpoint(self, name: str) -> None:
        self.removed.append(name)

    def write_text(self, name: str, text: str | bytes) -> None: ...

    def log_tasks(self, lines: Iterable[str]) -> None: ...


def validation(value: float, diverged: int) -> Any:
    return SimpleNamespace(final=value, diverged=diverged)


@pytest.mark.parametrize("task", ["synthetic", "sinusoid"])
def test_the_k_best_validations_are_kept_ties_to_the_earlier_never_a_nan(task: str) -> None:
    c = build(compose_config(*TINY, f"task={task}", "test.ensemble_top_k=3", "device=cpu"))
    higher = c.task.higher_is_better  # accuracy: higher; MSE: lower
    sign = 1 if higher else -1
    # validations at iterations 1..8 (metric over the finite tasks, diverged tasks)
    values = [(0.5, 0), (0.7, 0), (0.6, 0), (0.7, 0), (math.nan, 8), (0.9, 0), (0.4, 0), (1.0, 1)]
    state, recorder = LoopState(), Memory()
    for it, (value, diverged) in enumerate(values, start=1):
        keep_top(c, recorder, state, it, validation(sign * value, diverged))
    # 0.9 (iteration 6), 0.7 (2), then the tie 0.7 (4) kept after the earlier one, over 0.6
    # (3); 1.0 (8) is the best metric, but over 7 of 8 tasks: a task diverged
    assert [int(it) for _, it in state.top] == [2, 4, 6]
    assert recorder.saved == [top_name(i) for i in (1, 2, 3, 4, 6)]
    assert recorder.removed == [top_name(1), top_name(3)]
    off = build(compose_config(*TINY, f"task={task}", "device=cpu"))
    quiet, none = LoopState(), Memory()
    keep_top(off, none, quiet, 1, validation(0.5, 0))
    assert quiet.top == [] and none.saved == []


def test_ensemble_is_the_mean_prediction_of_the_best_checkpoints_and_survives_resume(
    tmp_path: Path,
) -> None:
    common = (*TINY, "task=sinusoid", "train.val_every=5", "test.ensemble_top_k=3", "optim=sgd")
    run_cli("train", *common, "train.iterations=30", "hydra.run.dir=full", cwd=tmp_path)
    run_cli("train", *common, "train.iterations=15", "hydra.run.dir=half", cwd=tmp_path)
    run_cli("train", "resume=half", "train.iterations=30", cwd=tmp_path)
    full = tmp_path / "full"
    summary = read_summary(full)
    assert summary["test_ensemble"] == read_summary(tmp_path / "half")["test_ensemble"]
    # the three lowest validation MSEs, kept on disk and nothing else
    vals = sorted((r["metric"], r["iteration"]) for r in read_metrics(full) if r["split"] == "val")
    best = sorted(it for _, it in vals[:3])
    assert summary["test_ensemble"]["checkpoint_iterations"] == best
    kept = sorted(p.name for p in (full / "checkpoints" / "top").iterdir())
    assert kept == [f"{top_name(it).split('/')[1]}.pt" for it in best]
    # by hand: each checkpoint's predictions on the same test tasks, averaged, then the MSE
    predictions, targets = [], None
    for it in best:
        c, _ = components_from(full / "checkpoints" / f"{top_name(it)}.pt")
        tasks = c.task.sample(c.run.test.num_tasks, "test", split_generator(c.run.seed, "test"))
        result = c.algorithm.evaluate(tasks, predictions=True)
        assert result.predictions is not None
        predictions.append(result.predictions[:, -1].double())
        targets = tasks.query_y.double()
    mean = torch.stack(predictions).mean(0)  # [tasks, Q, 1]
    mse = ((mean - targets) ** 2).mean(dim=(1, 2))
    assert summary["test_ensemble"]["mean"] == pytest.approx(mse.mean().item(), rel=1e-6)
    # the members' own mean MSE is another (larger) number: averaging happened first
    single = [((p - targets) ** 2).mean().item() for p in predictions]
    assert summary["test_ensemble"]["mean"] < sum(single) / len(single)
    line = [r for r in read_metrics(full) if r["split"] == "test_ensemble"]
    assert len(line) == 1 and line[0]["members"] == 3


def test_ensemble_top_k_must_be_off_or_at_least_two(tmp_path: Path) -> None:
    result = run_cli("train", *TINY, "test.ensemble_top_k=1", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "test.ensemble_top_k=1 is not allowed: it must be 0 (off) or >= 2" in result.stderr
