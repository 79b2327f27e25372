"""The one meta-training loop, and the evaluation that validation and meta-test share.

Per iteration: sample a meta-batch of tasks, compute the meta-loss, step the outer
optimizer. Every ``train.val_every`` iterations: evaluate on the fixed validation tasks,
keep ``best.pt``; every ``train.ckpt_every``: write ``last.pt``. Meta-test runs the same
``evaluate`` on the fixed test tasks.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from metacli import __version__
from metacli.checkpoint import FORMAT_VERSION, capture_rng, restore_rng
from metacli.console import PROGRESS_LOGGER, progress_bar
from metacli.errors import MetacliError
from metacli.tasks.base import split_generator

if TYPE_CHECKING:
    from metacli.build import Components
    from metacli.run import RunFolder

log = logging.getLogger(__name__)
progress_log = logging.getLogger(PROGRESS_LOGGER)


class Interrupted(MetacliError):
    """The user (Ctrl-C) or the scheduler (SIGTERM) stopped the run between two iterations."""


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a request the loop honours at the end of an iteration.

    Stopping between iterations lets the loop write a consistent last.pt first; a second
    Ctrl-C stops at once (the previous checkpoint stays intact).
    """
    requested: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield requested
        return
    try:
        yield requested
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass
class LoopState:
    iteration: int = 0  # outer updates done
    best_metric: float | None = None
    best_iteration: int | None = None
    wall_time: float = 0.0  # seconds spent training, summed over resumed sessions


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
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric_name": self.metric_name,
            "num_tasks": self.num_tasks,
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
        }


def evaluate(c: Components, split: str, num_tasks: int, batch_size: int) -> EvalSummary:
    """Adapt to ``num_tasks`` fixed tasks of ``split`` (seeded by seed and split alone)."""
    tasks = c.task.sample(num_tasks, split, split_generator(c.run.seed, split))
    was_training = c.algorithm.training
    c.algorithm.eval()
    losses, metrics = [], []
    for start in range(0, num_tasks, batch_size):
        result = c.algorithm.evaluate(tasks[start : start + batch_size].to(c.device))
        losses.append(result.loss.detach().double().cpu())
        metrics.append(result.metric.detach().double().cpu())
    c.algorithm.train(was_training)
    return EvalSummary.from_tensors(c.task.metric_name, torch.cat(losses), torch.cat(metrics))


def is_better(c: Components, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if c.task.higher_is_better else value < best


def learning_rates(c: Components) -> dict[str, float]:
    return {"lr": c.optimizer.param_groups[0]["lr"], **c.algorithm.inner_learning_rates()}


def make_checkpoint(c: Components, state: LoopState, overrides: list[str]) -> dict[str, Any]:
    """Everything needed to continue bit for bit, in one dict."""
    return {
        "format": "metacli",
        "format_version": FORMAT_VERSION,
        "metacli_version": __version__,
        "torch_version": str(torch.__version__),
        "iteration": state.iteration,
        "best_metric": state.best_metric,
        "best_iteration": state.best_iteration,
        "wall_time": state.wall_time,
        "algorithm": c.algorithm.state_dict(),
        "optimizer": c.optimizer.state_dict(),
        "scheduler": c.scheduler.state_dict() if c.scheduler is not None else None,
        "rng": capture_rng(c.train_generator),
        "config": OmegaConf.to_container(c.cfg, resolve=True),
        "overrides": list(overrides),
    }


def load_weights(c: Components, checkpoint: dict[str, Any], source: str) -> None:
    try:
        c.algorithm.load_state_dict(checkpoint["algorithm"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise MetacliError(
            f"The checkpoint {source} does not fit the configured algo/model "
            f"({first}). Use the same algo and model settings as the run that "
            f"wrote it."
        ) from None


def restore(c: Components, checkpoint: dict[str, Any], source: str) -> LoopState:
    load_weights(c, checkpoint, source)
    c.optimizer.load_state_dict(checkpoint["optimizer"])
    if c.scheduler is not None and checkpoint["scheduler"] is not None:
        c.scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng(checkpoint["rng"], c.train_generator)
    return LoopState(
        iteration=checkpoint["iteration"],
        best_metric=checkpoint["best_metric"],
        best_iteration=checkpoint["best_iteration"],
        wall_time=checkpoint["wall_time"],
    )


def meta_step(c: Components, grad_clip: float | None) -> tuple[Tensor, Tensor]:
    batch = c.task.sample(c.run.train.meta_batch_size, "train", c.train_generator).to(c.device)
    c.optimizer.zero_grad(set_to_none=True)
    loss, metric = c.algorithm.meta_loss(batch)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(c.algorithm.parameters(), grad_clip)
    c.optimizer.step()
    if c.scheduler is not None:
        c.scheduler.step()
    c.algorithm.observe(batch)
    return loss.detach(), metric.detach().mean()


def meta_train(c: Components, folder: RunFolder, state: LoopState) -> LoopState:
    cfg = c.run.train
    total, ckpt_every = cfg.iterations, cfg.ckpt_every or cfg.val_every
    name = c.task.metric_name
    window_loss = torch.zeros((), device=c.device)
    window_metric = torch.zeros((), device=c.device)
    window_n, window_start = 0, time.perf_counter()
    session_start, wall_before = time.perf_counter(), state.wall_time
    val_metric: float | None = None
    c.algorithm.train()
    with stop_requests() as stop, progress_bar(total, state.iteration) as bar:
        while state.iteration < total:
            loss, metric = meta_step(c, cfg.grad_clip)
            state.iteration += 1
            window_loss += loss
            window_metric += metric
            window_n += 1
            it = state.iteration
            state.wall_time = wall_before + time.perf_counter() - session_start
            if it % cfg.log_every == 0 or it == total:
                mean_loss = (window_loss / window_n).item()
                if not math.isfinite(mean_loss):
                    raise MetacliError(
                        f"The meta-loss became {mean_loss} by iteration {it}. "
                        f"Lower optim.lr or algo.inner_lr; checkpoints/last.pt "
                        f"still holds the last good state."
                    )
                speed = window_n / (time.perf_counter() - window_start)
                folder.log_metrics(
                    {
                        "iteration": it,
                        "split": "train",
                        "loss": mean_loss,
                        "metric": (window_metric / window_n).item(),
                        "metric_name": name,
                        **learning_rates(c),
                        "it_per_s": speed,
                        "wall_time": state.wall_time,
                    }
                )
                progress_log.info(
                    "iter %d/%d  loss %.4f  val %s %s  %.1f it/s  eta %s",
                    it,
                    total,
                    mean_loss,
                    name,
                    "-" if val_metric is None else f"{val_metric:.4f}",
                    speed,
                    _eta((total - it) / speed),
                )
                bar.update(
                    it, loss=mean_loss, **{f"val_{name}": val_metric}, **{"it/s": round(speed, 1)}
                )
                window_loss.zero_()
                window_metric.zero_()
                window_n, window_start = 0, time.perf_counter()
            if it % cfg.val_every == 0 or it == total:
                val = evaluate(c, "val", c.run.val.num_tasks, c.run.val.batch_size)
                val_metric = val.final
                improved = is_better(c, val.final, state.best_metric)
                if improved:
                    state.best_metric, state.best_iteration = val.final, it
                folder.log_metrics(
                    {**val.record(it, "val"), **learning_rates(c), "wall_time": state.wall_time}
                )
                log.info(
                    "iter %d: val %s %.4f ± %.4f (before adaptation %.4f)%s",
                    it,
                    name,
                    val.final,
                    val.metric_ci95[-1],
                    val.metric_mean[0],
                    "  [best]" if improved else "",
                )
                if improved:
                    folder.save_checkpoint("best", c, state)
            if it % ckpt_every == 0 or it == total:
                folder.save_checkpoint("last", c, state)
            bar.update(it)
            if stop:
                folder.save_checkpoint("last", c, state)
                raise Interrupted(
                    f"Stopped by {signal.Signals(stop[0]).name} at iteration {it} "
                    f"of {total}; checkpoints/last.pt holds it. Continue with: "
                    f"metacli train resume={folder.root}"
                )
    return state


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
