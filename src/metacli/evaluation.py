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
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from metacli import distributed
from metacli.build import Components
from metacli.checkpoint import LoopState, load_checkpoint
from metacli.console import PROGRESS_LOGGER, hms
from metacli.signals import STOPPER
from metacli.streams import task_keys
from metacli.tasks.base import TaskBatch, split_generator

logger = logging.getLogger(__name__)
progress_log = logging.getLogger(PROGRESS_LOGGER)


class TaskProgress:
    """Progress lines of a long evaluation: after ``first`` seconds, then every
    ``refresh`` (the README's promise: a line at least every 30 s, whatever the phase)."""

    def __init__(self, what: str, total: int, first: float = 5.0, refresh: float = 30.0):
        self.what, self.total, self.first, self.refresh = what, total, first, refresh
        self.start = self.last = time.perf_counter()
        self.lines = 0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < (self.first if self.lines == 0 else self.refresh):
            return
        rate = done / (now - self.start)
        if not done:
            progress_log.info("%s: its %d tasks drawn; adapting to them", self.what, self.total)
            self.last, self.lines = now, self.lines + 1
            return
        progress_log.info(
            "%s: %d of %d tasks  %.1f tasks/s  eta %s",
            self.what,
            done,
            self.total,
            rate,
            hms((self.total - done) / rate),
        )
        self.last, self.lines = now, self.lines + 1


class Recorder(Protocol):
    """Where the loop's and the meta-test's output goes: the run folder
    (``metacli.run_folder.RunFolder``), or memory in tests."""

    root: Path

    def log_metrics(self, record: dict[str, Any]) -> None: ...

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None: ...

    def remove_checkpoint(self, name: str) -> None: ...

    def write_text(self, name: str, text: str | bytes) -> None: ...

    def log_tasks(self, lines: Iterable[str]) -> None:
        """Append rows of ``tasks.csv`` (``TASKS_HEADER``'s columns)."""
        ...


@dataclass
class EvalSummary:
    """Query metric statistics over tasks after 0..k inner steps.

    A task whose loss or metric is NaN or infinite at any step diverged (its inner loop
    blew up): it is counted, and the statistics are over the tasks that stayed finite, so
    one diverged task does not turn an evaluation into NaN. The mean over every task
    (NaN or infinite where a task diverged) is kept as ``raw_mean``.
    """

    metric_name: str
    num_tasks: int
    metric_mean: list[float]  # [k+1], over the finite tasks
    metric_std: list[float]
    metric_ci95: list[float]  # 1.96 * std / sqrt(finite tasks)
    loss_mean: list[float]
    # every task's metric after 0..k steps [n, k+1], for tasks.csv and paired statistics
    per_task: Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, 1))
    # [n]: whether the task's loss or metric was non-finite at some step
    per_task_diverged: Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    diverged: int = 0  # tasks with a non-finite loss or metric at some step
    raw_mean: list[float] = field(default_factory=list)  # over every task, diverged too
    higher_is_better: bool = True  # the task's direction (accuracy: higher; MSE: lower)
    # What each task adapted with, where the algorithm says (an architecture it drew)
    labels: list[str] = field(repr=False, default_factory=list)

    @classmethod
    def from_tensors(cls, metric_name: str, loss: Tensor, metric: Tensor) -> EvalSummary:
        n = metric.shape[0]  # metric, loss: [n_tasks, k+1]
        finite = torch.isfinite(metric).all(dim=1) & torch.isfinite(loss).all(dim=1)
        kept, kept_loss, count = metric[finite], loss[finite], int(finite.sum())
        std = kept.std(dim=0, unbiased=True) if count > 1 else torch.zeros(metric.shape[1])
        mean = kept.mean(0) if count else torch.full((metric.shape[1],), math.nan)
        return cls(
            metric_name=metric_name,
            num_tasks=n,
            metric_mean=mean.tolist(),
            metric_std=std.tolist(),
            metric_ci95=(1.96 * std / math.sqrt(max(count, 1))).tolist(),
            loss_mean=(kept_loss.mean(0) if count else mean).tolist(),
            per_task=metric,
            per_task_diverged=~finite,
            diverged=n - count,
            raw_mean=metric.mean(0).tolist(),
        )

    @property
    def final(self) -> float:
        return self.metric_mean[-1]

    @property
    def finite_tasks(self) -> int:
        return self.num_tasks - self.diverged

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
            **self.divergence(),
            **({"distinct_labels": len(set(self.labels))} if self.labels else {}),
        }

    def divergence(self) -> dict[str, Any]:
        """The diverged tasks' count and the raw mean, where a task diverged."""
        if not self.diverged:
            return {}
        return {"diverged_tasks": self.diverged, "raw_mean": self.raw_mean[-1]}

    def describe(self) -> str:
        """The final metric for a log line: ``0.3700 ± 0.0500`` and, where tasks diverged,
        ``on 598 of 600 tasks; 2 diverged``."""
        text = f"{self.final:.4f} ± {self.metric_ci95[-1]:.4f}"
        if self.diverged:
            text += f" on {self.finite_tasks} of {self.num_tasks} tasks; {self.diverged} diverged"
        return text

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
            **self.divergence(),
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
    task = components.task_for(split)
    tasks = task.sample(num_tasks, split, split_generator(components.run.seed, split))
    return tasks.with_keys(task_keys(components.run.seed, split, 0, 0, num_tasks))


def evaluate(components: Components, split: str, num_tasks: int, batch_size: int) -> EvalSummary:
    """Adapt to ``num_tasks`` fixed tasks of ``split`` (seeded by seed and split alone);
    in a distributed run each rank adapts its share and the results are gathered in
    task order."""
    what = {"val": "validation", "test": "meta-test"}.get(split, split)
    progress = TaskProgress(what, num_tasks)
    share = distributed.WORLD.share(num_tasks)
    tasks = fixed_tasks(components, split, num_tasks)[share]
    progress.update(0)  # (drawing many tasks can take a while)
    was_training = components.algorithm.training
    components.algorithm.eval()
    count = len(tasks.query_y)
    # written into one tensor each: small results kept between a chunk's large transients
    # would fragment the heap (RSS tripled over 300,000 sinusoid tasks; docs/memory.md)
    loss, metric = torch.empty(0), torch.empty(0)
    labels: list[str] = []
    for start in range(0, count, batch_size):
        result = components.algorithm.evaluate(
            tasks[start : start + batch_size].to(components.device)
        )
        if not start:
            loss = torch.empty(count, *result.loss.shape[1:], dtype=torch.float64)
            metric = torch.empty(count, *result.metric.shape[1:], dtype=torch.float64)
        loss[start : start + batch_size] = result.loss.detach()
        metric[start : start + batch_size] = result.metric.detach()
        labels += result.labels or []
        progress.update(min(start + batch_size, count))
    losses, metrics = ([loss], [metric]) if count else ([], [])
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


def is_better(
    higher: bool, value: float, diverged: int, best: float | None, best_diverged: int | None
) -> bool:
    """Whether a validation beats the best so far: fewer diverged tasks, then a better
    metric over the finite ones (NaN where every task diverged, which any number beats).
    The first validation is the best so far, whatever it holds."""
    if best_diverged is None:
        return True
    if diverged != best_diverged:
        return diverged < best_diverged
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if higher else value < best


def after_steps(steps: int) -> str:
    """``after 1 step``, ``after 5 steps``; nothing for none (ProtoNets adapt no weights)."""
    return f"after {steps} step{'s' * (steps != 1)}" if steps else ""


# tasks.csv: every evaluated task's metric after each inner step, for statistics of one's
# own (compare's paired differences are computed from it), and whether the task diverged
# (its loss or metric non-finite at some step: an accuracy stays finite when the logits
# do not, and a loss can come back from inf to a finite number)
TASKS_HEADER = "split,iteration,seed,task,step,metric,diverged"


def task_rows(result: EvalSummary, split: str, iteration: int, seed: int) -> Iterator[str]:
    """The ``tasks.csv`` rows of an evaluation (``repr``: every digit, nan and inf), made
    as they are written: a meta-test of millions of tasks holds them as floats only."""
    count, block = result.per_task.shape[0], 10000
    diverged = result.per_task_diverged
    for start in range(0, count, block):
        values = result.per_task[start : start + block].tolist()
        flags = diverged[start : start + block].tolist() if diverged.numel() else []
        for offset, row in enumerate(values):
            flag = int(flags[offset]) if flags else 0
            for step, metric in enumerate(row):
                yield f"{split},{iteration},{seed},{start + offset},{step},{metric!r},{flag}"


def log(
    components: Components,
    recorder: Recorder,
    result: EvalSummary,
    iteration: int,
    split: str,
    **extra: Any,
) -> None:
    """An evaluation's metrics.jsonl line and its tasks.csv rows."""
    recorder.log_metrics({**result.record(iteration, split), **extra})
    recorder.log_tasks(task_rows(result, split, iteration, components.run.seed))


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
    progress = TaskProgress("meta-test of the ensemble", num_tasks * len(weights))
    for member, state_dict in enumerate(weights):
        components.algorithm.load_state_dict(state_dict)
        chunks = []
        for start in range(0, num_tasks, batch_size):
            result = components.algorithm.evaluate(
                tasks[start : start + batch_size].to(components.device), True
            )
            assert result.predictions is not None
            chunks.append(result.predictions.detach().double().cpu())
            progress.update(member * num_tasks + min(start + batch_size, num_tasks))
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
    log(components, recorder, result, iteration, split)
    steps = len(result.metric_mean) - 1
    (logger.warning if result.diverged else logger.info)(
        "%s on %d tasks: %s %s %s",
        "meta-test" if split == "test" else "meta-test of the last weights",
        result.num_tasks,
        result.metric_name,
        result.describe(),
        f"{after_steps(steps)} ({result.metric_mean[0]:.4f} before adaptation)"
        if steps
        else "(no inner steps)",
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
        logger.warning(
            "ensemble: %s missing; the meta-test averages the others", ", ".join(missing)
        )
    kept = [(it, path) for it, path in kept if path.exists()]
    if len(kept) < 2:
        logger.warning(
            "ensemble: fewer than two validation checkpoints kept; no ensemble meta-test"
        )
        return None
    weights = [load_checkpoint(path)["algorithm"] for _, path in kept]
    with STOPPER.during("the meta-test"):
        result = evaluate_ensemble(
            components, weights, components.run.test.num_tasks, components.run.test.batch_size
        )
    log(components, recorder, result, state.iteration, "test_ensemble", members=len(kept))
    logger.info(
        "meta-test of the mean prediction of the %d best validation checkpoints (iterations "
        "%s) on %d tasks: %s %s %s",
        len(kept),
        ", ".join(str(it) for it, _ in kept),
        result.num_tasks,
        result.metric_name,
        result.describe(),
        after_steps(len(result.metric_mean) - 1) or "(no inner steps)",
    )
    return {**result.as_dict(), "checkpoint_iterations": [it for it, _ in kept]}
