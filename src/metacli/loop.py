"""The one meta-training loop, and the evaluation that validation and meta-test share.

Per iteration: sample a meta-batch of tasks, compute the meta-loss, step the outer
optimizer. Every ``train.val_every`` iterations: evaluate on the fixed validation tasks,
keep ``best.pt``; every ``train.ckpt_every``: write ``last.pt``. Meta-test runs the same
``evaluate`` on the fixed test tasks. The loop writes only through a ``Recorder`` (the
run folder implements it), so it never knows where files go.
"""

from __future__ import annotations

import collections
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from metacli import distributed
from metacli.algorithms.base import MetaLoss
from metacli.build import Components
from metacli.checkpoint import LoopState, make
from metacli.console import PROGRESS_LOGGER, progress_bar
from metacli.engine.random import task_keys
from metacli.errors import MetacliError
from metacli.signals import STOPPER
from metacli.tasks.base import TaskBatch, split_generator

log = logging.getLogger(__name__)
progress_log = logging.getLogger(PROGRESS_LOGGER)


class Interrupted(MetacliError):
    """The user (Ctrl-C) or the scheduler (SIGTERM) stopped the run between two iterations."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class NonFinite(MetacliError):
    """The meta-loss or the meta-gradient is NaN or infinite (``train.on_nan``)."""


class Recorder(Protocol):
    """Where the loop's output goes (``metacli.run.RunFolder``)."""

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


def fixed_tasks(c: Components, split: str, num_tasks: int) -> TaskBatch:
    """The validation or test tasks of a run: seeded by seed and split alone."""
    tasks = c.task.sample(num_tasks, split, split_generator(c.run.seed, split))
    return tasks.with_keys(task_keys(c.run.seed, split, 0, 0, num_tasks))


def evaluate(c: Components, split: str, num_tasks: int, batch_size: int) -> EvalSummary:
    """Adapt to ``num_tasks`` fixed tasks of ``split`` (seeded by seed and split alone);
    in a distributed run each rank adapts its share and the results are gathered in
    task order."""
    share = distributed.WORLD.share(num_tasks)
    tasks = fixed_tasks(c, split, num_tasks)[share]
    was_training = c.algorithm.training
    c.algorithm.eval()
    losses, metrics, labels = [], [], []
    for start in range(0, len(tasks.query_y), batch_size):
        result = c.algorithm.evaluate(tasks[start : start + batch_size].to(c.device))
        losses.append(result.loss.detach().double().cpu())
        metrics.append(result.metric.detach().double().cpu())
        labels += result.labels or []
    c.algorithm.train(was_training)
    if distributed.WORLD.active:
        parts = distributed.gather((losses, metrics, labels))
        losses = [t for part in parts for t in part[0]]
        metrics = [t for part in parts for t in part[1]]
        labels = [label for part in parts for label in part[2]]
    summary = EvalSummary.from_tensors(c.task.metric_name, torch.cat(losses), torch.cat(metrics))
    summary.higher_is_better = c.task.higher_is_better
    summary.labels = labels
    return summary


def is_better(c: Components, value: float, best: float | None) -> bool:
    """Whether a validation metric beats the best so far; a NaN or infinite one never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if c.task.higher_is_better else value < best


def learning_rates(c: Components) -> dict[str, float]:
    """The outer learning rate of each parameter group (``lr``: the initialisation's) and
    the algorithm's own scalars (inner learning rates, ...)."""
    rates = {
        "lr" if i == 0 else f"lr_{g.get('name', i)}": float(g["lr"])
        for i, g in enumerate(c.optimizer.param_groups)
    }
    return {**rates, **c.algorithm.scalars()}


def sample(c: Components) -> TaskBatch:
    """The next training meta-batch; task i of iteration t draws from the random stream
    (seed, train, t, i), so its draws survive a resume and do not depend on the batching."""
    size = c.run.train.meta_batch_size
    batch = c.task.sample(size, "train", c.train_generator).to(c.device)
    if not c.algorithm.executor.stochastic:  # nothing draws: no keys needed
        return batch
    keys = task_keys(c.run.seed, "train", int(c.algorithm.outer_steps), 0, size, c.device)
    return batch.with_keys(keys)


def nonfinite(c: Components, loss: Tensor) -> str | None:
    """What is NaN or infinite after the backward pass: None when everything is finite.

    One check and one synchronisation per iteration over the loss and every gradient
    (about 40 us for the sinusoid MLP); names are looked up only when something is wrong.
    """
    grads = [p.grad for g in c.optimizer.param_groups for p in g["params"] if p.grad is not None]
    values = torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])
    if bool(torch.isfinite(values).all()):
        return None
    if not bool(torch.isfinite(loss).all()):
        return f"the meta-loss ({loss.item()})"
    for name, p in c.algorithm.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the meta-gradient of {name}"
    return "the meta-gradient"


def meta_step(
    c: Components, grad_clip: float | None, grad_clamp: float | None = None
) -> MetaLoss | str:
    """One outer update; returns the meta-loss (detached), the mean metric and the terms,
    or, when the loss or the gradient is not finite, what is not (and updates nothing)."""
    batch = sample(c)
    c.optimizer.zero_grad(set_to_none=True)
    if distributed.WORLD.active:
        out = distributed_objective(c, batch)
    else:
        out = c.algorithm.objective(batch)
        out.loss.backward()
    bad = nonfinite(c, out.loss)
    if bad is not None:
        c.optimizer.zero_grad(set_to_none=True)
        return bad
    if grad_clamp is not None:  # cbfinn/maml and MAML++ on mini-ImageNet: [-10, 10]
        torch.nn.utils.clip_grad_value_(c.algorithm.parameters(), grad_clamp)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(c.algorithm.parameters(), grad_clip)
    for group in c.optimizer.param_groups:
        if group.get("fresh_state"):  # as if this group's optimizer were new
            for p in group["params"]:
                c.optimizer.state.pop(p, None)
    c.optimizer.step()
    if c.scheduler is not None:
        c.scheduler.step()
    c.algorithm.observe(batch)
    return MetaLoss(out.loss.detach(), out.metric.detach().mean(), out.terms)


def distributed_objective(c: Components, batch: TaskBatch) -> MetaLoss:
    """This rank's share of the meta-batch, backpropagated with weight share / meta-batch,
    and the gradients, loss, metric and terms summed over the ranks in one all-reduce.

    The sum of the weighted objectives is the one-process objective (a penalty on the
    meta-parameters too: the weights sum to one).
    """
    size = len(batch.query_y)
    share = distributed.WORLD.share(size)
    weight = (share.stop - share.start) / size
    out = c.algorithm.objective(batch[share])
    (out.loss * weight).backward()
    grads = [p.grad for g in c.optimizer.param_groups for p in g["params"] if p.grad is not None]
    names = sorted(out.terms)
    values = [out.loss.detach(), out.metric.detach().mean(), *(out.terms[n] for n in names)]
    dtype = grads[0].dtype if grads else out.loss.dtype
    flat = torch.cat(
        [*(g.reshape(-1) for g in grads), *(weight * v.reshape(1).to(dtype) for v in values)]
    )
    distributed.all_reduce_sum(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    loss, metric, *terms = flat[offset:].unbind()
    return MetaLoss(loss, metric.reshape(1), dict(zip(names, terms, strict=True)))


def write_artifacts(c: Components, recorder: Recorder) -> None:
    for name, text in c.algorithm.artifacts().items():
        recorder.write_text(name, text)


class Progress:
    """Progress lines: every ``log_every`` iterations and at least every ``refresh``
    seconds (the first after ``first`` seconds, so a slow run shows life at once); the
    ETA comes from a smoothed rate; a projection beyond an hour is said once."""

    def __init__(self, total: int, done: int, first: float = 2.0, refresh: float = 30.0) -> None:
        self.total, self.first, self.refresh = total, first, refresh
        self.start = self.last = time.perf_counter()
        self.start_it = self.last_it = done
        self.rate: float | None = None  # iterations per second, smoothed
        self.lines, self.warned = 0, False

    def due(self, it: int) -> bool:
        wait = self.first if self.lines == 0 else self.refresh
        return time.perf_counter() - self.last >= wait

    def update(self, it: int) -> float | None:
        """Fold the iterations since the last line into the rate; returns it."""
        now = time.perf_counter()
        if it > self.last_it and now > self.last:
            rate = (it - self.last_it) / (now - self.last)
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        self.last, self.last_it, self.lines = now, it, self.lines + 1
        return self.rate

    def eta(self, it: int) -> float | None:
        return None if not self.rate else (self.total - it) / self.rate

    def long_run_note(self, it: int) -> str | None:
        """Once, after 30 s or 50 iterations: the projected time if it exceeds an hour."""
        eta = self.eta(it)
        if self.warned or eta is None or eta < 3600:
            return None
        if time.perf_counter() - self.start < 30 and it - self.start_it < 50:
            return None
        self.warned = True
        return (
            f"At {self.rate:.2f} it/s the remaining {self.total - it} iterations take about "
            f"{_eta(eta)} (h:mm:ss); lower train.iterations for a shorter run."
        )


def meta_train(c: Components, recorder: Recorder, state: LoopState) -> LoopState:
    cfg = c.run.train
    total, ckpt_every = cfg.iterations, cfg.ckpt_every or cfg.val_every
    name = c.task.metric_name
    window = Window()
    progress = Progress(total, state.iteration)
    session_start, wall_before = time.perf_counter(), state.wall_time
    val_metric: float | None = None
    loss: float | None = None  # of the last train line
    saved_at = state.iteration if state.iteration > 0 else None  # what last.pt holds
    skipped, in_a_row = 0, 0

    def save(which: str) -> None:
        nonlocal saved_at
        recorder.save_checkpoint(which, make(c, state))
        if which == "last":
            saved_at = state.iteration

    def kept() -> str:
        if saved_at is None:
            return "no checkpoint was written yet"
        return f"checkpoints/last.pt holds iteration {saved_at}, the last good state"

    c.algorithm.train()
    training = STOPPER.during("meta-training", graceful=True)  # a first signal: a request
    with progress_bar(total, state.iteration) as bar, training:
        while state.iteration < total:
            step = meta_step(c, cfg.grad_clip, cfg.grad_clamp)
            state.iteration += 1
            it = state.iteration
            if isinstance(step, str):
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if cfg.on_nan == "stop" or in_a_row > cfg.nan_skips:
                    why = (
                        "train.on_nan=stop"
                        if cfg.on_nan == "stop"
                        else f"{in_a_row} iterations in a row, more than train.nan_skips="
                        f"{cfg.nan_skips}"
                    )
                    raise NonFinite(
                        f"{step[0].upper()}{step[1:]} is not finite at iteration {it} ({why}); "
                        f"{kept()}. Lower optim.lr or algo.inner_lr, set train.grad_clip, or "
                        f"set train.on_nan=skip to skip such updates."
                    )
                log.warning("iteration %d: %s is not finite; update skipped", it, step)
            else:
                in_a_row = 0
                window.add(step)
            state.wall_time = wall_before + time.perf_counter() - session_start
            logged = it % cfg.log_every == 0 or it == total
            if logged and window.count:
                record = window.record(it)
                speed = record.pop("it_per_s")
                loss = record["loss"]
                recorder.log_metrics(
                    {
                        "iteration": it,
                        "split": "train",
                        **record,
                        "metric_name": name,
                        **learning_rates(c),
                        **({"nan_skipped": skipped} if skipped else {}),
                        "it_per_s": speed,
                        "wall_time": state.wall_time,
                    }
                )
                bar.update(it, loss=record["loss"], **{f"val_{name}": val_metric})
            if logged or progress.due(it):
                rate = progress.update(it)
                eta = progress.eta(it)
                progress_log.info(
                    "iter %d/%d  loss %s  val %s %s  %.2f it/s  eta %s",
                    it,
                    total,
                    "-" if loss is None else f"{loss:.4f}",
                    name,
                    "-" if val_metric is None else f"{val_metric:.4f}",
                    rate or 0.0,
                    "-" if eta is None else _eta(eta),
                )
                note = progress.long_run_note(it)
                if note:
                    log.warning(note)
                bar.update(it, **{"it/s": round(rate or 0.0, 2)})
            if it % cfg.val_every == 0 or it == total:
                with STOPPER.during("validation", graceful=True):
                    val = evaluate(c, "val", c.run.val.num_tasks, c.run.val.batch_size)
                val_metric = val.final
                improved = is_better(c, val.final, state.best_metric)
                if improved:
                    state.best_metric, state.best_iteration = val.final, it
                hooked = c.algorithm.on_validation(it, val.final)
                recorder.log_metrics(
                    {
                        **val.record(it, "val"),
                        **learning_rates(c),
                        **hooked,
                        "wall_time": state.wall_time,
                    }
                )
                write_artifacts(c, recorder)
                (log.warning if val.nonfinite else log.info)(
                    "iter %d: val %s %.4f ± %.4f (before adaptation %.4f)%s%s",
                    it,
                    name,
                    val.final,
                    val.metric_ci95[-1],
                    val.metric_mean[0],
                    "  [best]" if improved else "",
                    val.describe_nonfinite(validation=True),
                )
                if improved:
                    save("best")
                keep_top(c, recorder, state, it, val.final)
            if it == total:
                ended = c.algorithm.on_train_end(it)
                if ended:
                    recorder.log_metrics({"iteration": it, "split": "train_end", **ended})
                write_artifacts(c, recorder)
            if it % ckpt_every == 0 or it == total:
                save("last")
            bar.update(it)
            if distributed.WORLD.active:  # all ranks stop after the same iteration
                STOPPER.requested = distributed.agree_on_stop(STOPPER.requested)
            if STOPPER.requested is not None:
                if saved_at != it:
                    save("last")
                STOPPER.stopping = True  # recording the stop: further signals are ignored
                signum = STOPPER.requested
                raise Interrupted(
                    f"Stopped by {signal.Signals(signum).name} at iteration {it} "
                    f"of {total}; checkpoints/last.pt holds it. Continue with: "
                    f"metacli train resume={recorder.root}",
                    signum,
                )
    return state


def top_name(iteration: int) -> str:
    """The checkpoint name of a validation kept for the ensemble (``checkpoints/top/``)."""
    return f"top/val_{iteration:08d}"


def keep_top(c: Components, recorder: Recorder, state: LoopState, it: int, value: float) -> None:
    """Keep the ``test.ensemble_top_k`` best validation checkpoints (MAML++'s code keeps
    its 5 best epochs and averages their predictions at the meta-test). Ties keep the
    earlier; a non-finite validation is never kept."""
    k = c.run.test.ensemble_top_k
    if k < 2 or not math.isfinite(value):
        return
    entry = [value, it]
    ranked = sorted([*state.top, entry], key=lambda e: e[0], reverse=c.task.higher_is_better)
    kept, dropped = ranked[:k], ranked[k:]
    if entry not in kept:
        return
    state.top = sorted(kept, key=lambda e: e[1])
    recorder.save_checkpoint(top_name(it), make(c, state))
    for _, old in dropped:
        recorder.remove_checkpoint(top_name(int(old)))


def evaluate_ensemble(
    c: Components, weights: list[dict[str, Tensor]], num_tasks: int, batch_size: int
) -> EvalSummary:
    """The fixed meta-test tasks, each predicted by the mean of the predictions (logits,
    or regression outputs) of every set of ``weights`` after 0..k inner steps, as MAML++'s
    ``evaluated_test_set_using_the_best_models``."""
    tasks = fixed_tasks(c, "test", num_tasks)
    was_training = c.algorithm.training
    c.algorithm.eval()
    total: Tensor | None = None
    for state_dict in weights:
        c.algorithm.load_state_dict(state_dict)
        chunks = []
        for start in range(0, num_tasks, batch_size):
            result = c.algorithm.evaluate(tasks[start : start + batch_size].to(c.device), True)
            assert result.predictions is not None
            chunks.append(result.predictions.detach().double().cpu())
        predictions = torch.cat(chunks)  # [n, k+1, Q, ...]
        total = predictions if total is None else total + predictions
    c.algorithm.train(was_training)
    assert total is not None
    mean = total / len(weights)
    targets = tasks.query_y.double() if tasks.query_y.is_floating_point() else tasks.query_y
    losses, metrics = [], []
    for i in range(num_tasks):
        losses.append(torch.stack([c.task.loss(step, targets[i]) for step in mean[i]]))
        metrics.append(torch.stack([c.task.metric(step, targets[i]) for step in mean[i]]))
    summary = EvalSummary.from_tensors(
        c.task.metric_name, torch.stack(losses).double(), torch.stack(metrics).double()
    )
    summary.higher_is_better = c.task.higher_is_better
    return summary


class Window:
    """Train-line statistics over the iterations since the last log line (kept on the
    device until logged, so logging does not synchronise every step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count, self.start = 0, time.perf_counter()

    def add(self, step: MetaLoss) -> None:
        values = {"loss": step.loss, "metric": step.metric, **step.terms}
        for key, value in values.items():
            total = self.sums.get(key)
            self.sums[key] = value.detach() if total is None else total + value.detach()
        self.count += 1

    def record(self, iteration: int) -> dict[str, float]:
        """Window means (loss, metric, every named term) and it/s; starts a new window."""
        speed = self.count / (time.perf_counter() - self.start)
        means = {key: (value / self.count).item() for key, value in self.sums.items()}
        self.reset()
        return {**means, "it_per_s": speed}


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
