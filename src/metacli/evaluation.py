"""Evaluation: the fixed validation and test tasks, adapting to them, the statistics over
tasks, and the meta-test (of the weights in memory, and of the mean prediction of the best
validation checkpoints, ``test.ensemble_top_k``).

Validation (from the training loop) and the meta-test (after training, and ``metacli
test``) both run ``evaluate``: every task of the split adapted on its support set and
measured on its query set after each inner step. The tasks are a function of ``seed``
and the split alone, so every algorithm run with the same seed meets the same ones.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from metacli import distributed
from metacli.build import Components
from metacli.checkpoint import LoopState, load_checkpoint
from metacli.signals import STOPPER
from metacli.streams import task_keys
from metacli.tasks.base import TaskBatch, split_generator

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Where the loop's and the meta-test's output goes: the run folder
    (``metacli.run_folder.RunFolder``), or memory in tests."""

    root: Path

    def log_metrics(self, record: dict[str, Any]) -> None: ...

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None: ...

    def remove_checkpoint(self, name: str) -> None: ...

    def write_text(self, name: str, text: str | bytes) -> None: ...


@dataclass
class EvalSummary:
    """Query metric statistics over tasks after 0..k inner steps."""

    metric_name: str
    num_tasks: int
    metric_mean: list[float]  # [k+1]
    metric_std: list[float]
    metric_ci95: list[float]  # 1.96 * std / sqrt(n)
    loss_mean: list[float]
    per_task: list[float] = field(repr=False, default_factory=list)  # final metric of each task
    # Tasks whose metric after adaptation is NaN or infinite (an inner loop that diverged):
    # the mean is then non-finite too, and such an evaluation is never selected as best.
    nonfinite: int = 0
    higher_is_better: bool = True  # the task's direction (accuracy: higher; MSE: lower)
    # What each task adapted with, where the algorithm says (an architecture it drew)
    labels: list[str] = field(repr=False, default_factory=list)

    @classmethod
    def from_tensors(cls, metric_name: str, loss: Tensor, metric: Tensor) -> EvalSummary:
        n = metric.shape[0]  # metric, loss: [n_tasks, k+1]
        std = metric.std(dim=0, unbiased=True) if n > 1 else torch.zeros(metric.shape[1])
        return cls(
            metric_name=metric_name,
            num_tasks=n,
            metric_mean=metric.mean(0).tolist(),
            metric_std=std.tolist(),
            metric_ci95=(1.96 * std / math.sqrt(n)).tolist(),
            loss_mean=loss.mean(0).tolist(),
            per_task=metric[:, -1].tolist(),
            nonfinite=int((~torch.isfinite(metric[:, -1])).sum()),
        )

    @property
    def final(self) -> float:
        return self.metric_mean[-1]

    def record(self, iteration: int, split: str) -> dict[str, Any]:
        """The metrics.jsonl line of a validation or meta-test."""
        return {
            "iteration": iteration,
            "split": split,
            "loss": self.loss_mean[-1],
            "metric": self.final,
            "metric_name": self.metric_name,
            "metric_ci95": self.metric_ci95[-1],
            "metric_before": self.metric_mean[0],
            "metric_per_step": self.metric_mean,
            "num_tasks": self.num_tasks,
            **({"nonfinite_tasks": self.nonfinite} if self.nonfinite else {}),
            **({"distinct_labels": len(set(self.labels))} if self.labels else {}),
        }

    def describe_nonfinite(self, validation: bool = False) -> str:
        """'' when every task's metric is finite; else how many were not (and, for a
        validation, that it is never selected as best)."""
        if not self.nonfinite:
            return ""
        never = "; never selected as best" if validation else ""
        return (
            f"  [non-finite on {self.nonfinite} of {self.num_tasks} tasks: the inner loop "
            f"diverged{never}]"
        )

    def label_counts(self) -> dict[str, Any]:
        """How many tasks adapted with each label (most frequent first), if any."""
        if not self.labels:
            return {}
        counts = collections.Counter(self.labels).most_common()
        return {"labels": {"distinct": len(counts), "counts": dict(counts)}}

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "num_tasks": self.num_tasks,
            **({"nonfinite_tasks": self.nonfinite} if self.nonfinite else {}),
            "inner_steps": len(self.metric_mean) - 1,
            "mean": self.metric_mean[-1],
            "std": self.metric_std[-1],
            "ci95": self.metric_ci95[-1],
            "before_adaptation": {
                "mean": self.metric_mean[0],
                "std": self.metric_std[0],
                "ci95": self.metric_ci95[0],
            },
            "per_step": {
                "mean": self.metric_mean,
                "std": self.metric_std,
                "ci95": self.metric_ci95,
                "loss": self.loss_mean,
            },
            **self.label_counts(),
        }


def fixed_tasks(components: Components, split: str, num_tasks: int) -> TaskBatch:
    """The validation or test tasks of a run: seeded by seed and split alone."""
    tasks = components.task.sample(num_tasks, split, split_generator(components.run.seed, split))
    return tasks.with_keys(task_keys(components.run.seed, split, 0, 0, num_tasks))


def evaluate(components: Components, split: str, num_tasks: int, batch_size: int) -> EvalSummary:
    """Adapt to ``num_tasks`` fixed tasks of ``split`` (seeded by seed and split alone);
    in a distributed run each rank adapts its share and the results are gathered in
    task order."""
    share = distributed.WORLD.share(num_tasks)
    tasks = fixed_tasks(components, split, num_tasks)[share]
    was_training = components.algorithm.training
    components.algorithm.eval()
    losses, metrics, labels = [], [], []
    for start in range(0, len(tasks.query_y), batch_size):
        result = components.algorithm.evaluate(
            tasks[start : start + batch_size].to(components.device)
        )
        losses.append(result.loss.detach().double().cpu())
        metrics.append(result.metric.detach().double().cpu())
        labels += result.labels or []
    components.algorithm.train(was_training)
    if distributed.WORLD.active:
        parts = distributed.gather((losses, metrics, labels))
        losses = [t for part in parts for t in part[0]]
        metrics = [t for part in parts for t in part[1]]
        labels = [label for part in parts for label in part[2]]
    summary = EvalSummary.from_tensors(
        components.task.metric_name, torch.cat(losses), torch.cat(metrics)
    )
    summary.higher_is_better = components.task.higher_is_better
    summary.labels = labels
    return summary


def is_better(components: Components, value: float, best: float | None) -> bool:
    """Whether a validation metric beats the best so far; a NaN or infinite one never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if components.task.higher_is_better else value < best


def top_name(iteration: int) -> str:
    """The checkpoint name of a validation kept for the ensemble (``checkpoints/top/``)."""
    return f"top/val_{iteration:08d}"


def evaluate_ensemble(
    components: Components, weights: list[dict[str, Tensor]], num_tasks: int, batch_size: int
) -> EvalSummary:
    """The fixed meta-test tasks, each predicted by the mean of the predictions (logits,
    or regression outputs) of every set of ``weights`` after 0..k inner steps, as MAML++'s
    ``evaluated_test_set_using_the_best_models``."""
    tasks = fixed_tasks(components, "test", num_tasks)
    was_training = components.algorithm.training
    components.algorithm.eval()
    total: Tensor | None = None
    for state_dict in weights:
        components.algorithm.load_state_dict(state_dict)
        chunks = []
        for start in range(0, num_tasks, batch_size):
            result = components.algorithm.evaluate(
                tasks[start : start + batch_size].to(components.device), True
            )
            assert result.predictions is not None
            chunks.append(result.predictions.detach().double().cpu())
        predictions = torch.cat(chunks)  # [n, k+1, Q, ...]
        total = predictions if total is None else total + predictions
    components.algorithm.train(was_training)
    assert total is not None
    mean = total / len(weights)
    targets = tasks.query_y.double() if tasks.query_y.is_floating_point() else tasks.query_y
    losses, metrics = [], []
    for i in range(num_tasks):
        losses.append(torch.stack([components.task.loss(step, targets[i]) for step in mean[i]]))
        metrics.append(torch.stack([components.task.metric(step, targets[i]) for step in mean[i]]))
    summary = EvalSummary.from_tensors(
        components.task.metric_name, torch.stack(losses).double(), torch.stack(metrics).double()
    )
    summary.higher_is_better = components.task.higher_is_better
    return summary


def meta_test(
    components: Components, recorder: Recorder, iteration: int, split: str = "test"
) -> EvalSummary:
    """The fixed meta-test tasks on the weights in memory; ``split`` names the record
    (``test_last``: the last weights, besides the best ones)."""
    with STOPPER.during("the meta-test"):
        result = evaluate(
            components, "test", components.run.test.num_tasks, components.run.test.batch_size
        )
    recorder.log_metrics(result.record(iteration, split))
    (log.warning if result.nonfinite else log.info)(
        "%s on %d tasks: %s %.4f ± %.4f after %d steps (%.4f before adaptation)%s",
        "meta-test" if split == "test" else "meta-test of the last weights",
        result.num_tasks,
        result.metric_name,
        result.final,
        result.metric_ci95[-1],
        len(result.metric_mean) - 1,
        result.metric_mean[0],
        result.describe_nonfinite(),
    )
    return result


def meta_test_ensemble(
    components: Components, recorder: Recorder, state: LoopState, checkpoints: Path
) -> dict[str, Any] | None:
    """With ``test.ensemble_top_k``: the fixed meta-test tasks on the mean prediction of
    the best validation checkpoints kept in ``checkpoints`` (``top/``) (None when off, or with
    fewer than two kept). The weights in memory change; nothing after uses them."""
    if components.run.test.ensemble_top_k < 2:
        return None
    kept = [(int(it), checkpoints / f"{top_name(int(it))}.pt") for _, it in state.top]
    missing = [str(path) for _, path in kept if not path.exists()]
    if missing:
        log.warning("ensemble: %s missing; the meta-test averages the others", ", ".join(missing))
    kept = [(it, path) for it, path in kept if path.exists()]
    if len(kept) < 2:
        log.warning("ensemble: fewer than two validation checkpoints kept; no ensemble meta-test")
        return None
    weights = [load_checkpoint(path)["algorithm"] for _, path in kept]
    with STOPPER.during("the meta-test"):
        result = evaluate_ensemble(
            components, weights, components.run.test.num_tasks, components.run.test.batch_size
        )
    recorder.log_metrics({**result.record(state.iteration, "test_ensemble"), "members": len(kept)})
    log.info(
        "meta-test of the mean prediction of the %d best validation checkpoints (iterations "
        "%s) on %d tasks: %s %.4f ± %.4f after %d steps",
        len(kept),
        ", ".join(str(it) for it, _ in kept),
        result.num_tasks,
        result.metric_name,
        result.final,
        result.metric_ci95[-1],
        len(result.metric_mean) - 1,
    )
    return {**result.as_dict(), "checkpoint_iterations": [it for it, _ in kept]}
