"""The one meta-training loop.

Per iteration: sample a meta-batch of tasks, compute the meta-loss, step the outer
optimizer. Every ``train.val_every`` iterations: evaluate on the fixed validation tasks
(``metacli.evaluation``), keep ``best.pt``; every ``train.ckpt_every``: write ``last.pt``.
The loop writes only through a ``Recorder`` (the run folder implements it), so it never
knows where files go.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any

import torch
from torch import Tensor

from metacli import distributed, evaluation
from metacli.algorithms.base import MetaLoss
from metacli.build import Components
from metacli.checkpoint import LoopState, make
from metacli.console import PROGRESS_LOGGER, hms, progress_bar
from metacli.errors import MetacliError
from metacli.evaluation import EvalSummary, Recorder, evaluate, is_better, top_name
from metacli.machine import LoadWatch
from metacli.signals import STOPPER, Interrupted
from metacli.streams import task_keys
from metacli.tasks.base import TaskBatch

log = logging.getLogger(__name__)
progress_log = logging.getLogger(PROGRESS_LOGGER)


class NonFinite(MetacliError):
    """The meta-loss or the meta-gradient is NaN or infinite (``train.on_nan``)."""


def learning_rates(components: Components) -> dict[str, float]:
    """The outer learning rate of each parameter group (``lr``: the initialisation's) and
    the algorithm's own scalars (inner learning rates, ...)."""
    rates = {
        "lr" if i == 0 else f"lr_{g.get('name', i)}": float(g["lr"])
        for i, g in enumerate(components.optimizer.param_groups)
    }
    return {**rates, **components.algorithm.scalars()}


def sample(components: Components) -> TaskBatch:
    """The next training meta-batch; task i of iteration t draws from the random stream
    (seed, train, t, i), so its draws survive a resume and do not depend on the batching."""
    size = components.run.train.meta_batch_size
    generator = components.train_generator
    batch = components.algorithm.training_batch(components.task, size, generator)
    iteration = int(components.algorithm.outer_steps)
    if getattr(components.task.cfg, "augment", "none") != "none":  # a stream of its own
        augment_keys = task_keys(components.run.seed, "augment", iteration, 0, len(batch))
        batch = components.task.augment_batch(batch, augment_keys)
    batch = batch.to(components.device)
    if not components.algorithm.executor.stochastic:  # nothing draws: no keys needed
        return batch
    keys = task_keys(components.run.seed, "train", iteration, 0, size, components.device)
    return batch.with_keys(keys)


def nonfinite(components: Components, loss: Tensor) -> str | None:
    """What is NaN or infinite after the backward pass: None when everything is finite.

    One check and one synchronisation per iteration over the loss and every gradient
    (docs/versus.md measures it); names are looked up only when something is wrong.
    """
    grads = [
        p.grad for g in components.optimizer.param_groups for p in g["params"] if p.grad is not None
    ]
    values = torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])
    if bool(torch.isfinite(values).all()):
        return None
    if not bool(torch.isfinite(loss).all()):
        return f"the meta-loss ({loss.item()})"
    for name, p in components.algorithm.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the meta-gradient of {name}"
    return "the meta-gradient"


def meta_step(
    components: Components, grad_clip: float | None, grad_clamp: float | None = None
) -> MetaLoss | str:
    """One outer update; returns the meta-loss (detached), the mean metric and the terms,
    or, when the loss or the gradient is not finite, what is not (and updates nothing)."""
    batch = sample(components)
    components.optimizer.zero_grad(set_to_none=True)
    if distributed.WORLD.active:
        out = distributed_objective(components, batch)
    else:
        out = components.algorithm.objective(batch)
        out.loss.backward()
    bad = nonfinite(components, out.loss)
    if bad is not None:
        components.optimizer.zero_grad(set_to_none=True)
        return bad
    if grad_clamp is not None:  # cbfinn/maml and MAML++ on mini-ImageNet: [-10, 10]
        torch.nn.utils.clip_grad_value_(components.algorithm.parameters(), grad_clamp)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(components.algorithm.parameters(), grad_clip)
    for group in components.optimizer.param_groups:
        if group.get("fresh_state"):  # as if this group's optimizer were new
            for p in group["params"]:
                components.optimizer.state.pop(p, None)
    components.optimizer.step()
    if components.scheduler is not None:
        components.scheduler.step()
    components.algorithm.observe(batch)
    return MetaLoss(out.loss.detach(), out.metric.detach().mean(), out.terms)


def distributed_objective(components: Components, batch: TaskBatch) -> MetaLoss:
    """This rank's share of the meta-batch, backpropagated with weight share / meta-batch,
    and the gradients, loss, metric and terms summed over the ranks in one all-reduce.

    The sum of the weighted objectives is the one-process objective (a penalty on the
    meta-parameters too: the weights sum to one).
    """
    if not components.algorithm.episodic:
        raise MetacliError(
            f"algo={components.algorithm.cfg.name} trains on mini-batches of images, which "
            f"distributed training does not split between processes yet. Run it in one "
            f"process (distributed.nproc=1)."
        )
    size = len(batch.query_y)
    share = distributed.WORLD.share(size)
    weight = (share.stop - share.start) / size
    out = components.algorithm.objective(batch[share])
    (out.loss * weight).backward()
    grads = [
        p.grad for g in components.optimizer.param_groups for p in g["params"] if p.grad is not None
    ]
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


def write_artifacts(components: Components, recorder: Recorder) -> None:
    for name, text in components.algorithm.artifacts().items():
        recorder.write_text(name, text)


class Progress:
    """Progress lines: every ``log_every`` iterations and at least every ``refresh``
    seconds (the first after ``first`` seconds, so a slow run shows life at once); a
    projection beyond an hour is said once.

    The ETA is the remaining iterations at the training rate since the first line (the
    first iterations, slower while caches and allocators warm up, left out once a later
    line exists; validations left out), plus the remaining validations at the mean time
    of those done (``val_every``)."""

    def __init__(
        self,
        total: int,
        done: int,
        first: float = 2.0,
        refresh: float = 30.0,
        val_every: int | None = None,
    ) -> None:
        self.total, self.first, self.refresh, self.val_every = total, first, refresh, val_every
        self.start = self.last = time.perf_counter()
        self.start_it = self.last_it = done
        self.rate: float | None = None  # training iterations per second
        self.lines, self.warned = 0, False
        self.eval_seconds, self.evals = 0.0, 0  # validations so far, and their time
        self.mark: tuple[float, int, float] | None = None  # the first line: time, it, eval s

    def due(self, it: int) -> bool:
        wait = self.first if self.lines == 0 else self.refresh
        return time.perf_counter() - self.last >= wait

    def evaluated(self, seconds: float) -> None:
        """A validation took ``seconds``."""
        self.eval_seconds += seconds
        self.evals += 1

    def update(self, it: int) -> float | None:
        """The training rate at this line; returns it."""
        now = time.perf_counter()
        since, done, evals = self.mark or (self.start, self.start_it, 0.0)
        seconds = now - since - (self.eval_seconds - evals)
        if it > done and seconds > 0:
            self.rate = (it - done) / seconds
        if self.mark is None and it > self.start_it:
            self.mark = (now, it, self.eval_seconds)
        self.last, self.last_it, self.lines = now, it, self.lines + 1
        return self.rate

    def eta(self, it: int) -> float | None:
        if not self.rate:
            return None
        remaining = (self.total - it) / self.rate
        if self.val_every and self.evals:
            left = self.total // self.val_every - it // self.val_every
            left += 0 if self.total % self.val_every == 0 else 1  # the last iteration's
            remaining += max(0, left) * self.eval_seconds / self.evals
        return remaining

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
            f"{hms(eta)} (h:mm:ss); lower train.iterations for a shorter run."
        )


def meta_train(components: Components, recorder: Recorder, state: LoopState) -> LoopState:
    cfg = components.run.train
    total, ckpt_every = cfg.iterations, cfg.ckpt_every or cfg.val_every
    name = components.task.metric_name
    window = Window(state.window)
    progress = Progress(total, state.iteration, val_every=cfg.val_every)
    watch = LoadWatch(torch.get_num_threads())
    session_start, wall_before = time.perf_counter(), state.wall_time
    val_metric: float | None = None
    means: dict[str, float] = {}  # of the last train line
    saved_at = state.iteration if state.iteration > 0 else None  # what last.pt holds
    skipped, in_a_row = state.nan_skipped, state.nan_in_a_row

    def save(which: str) -> None:
        nonlocal saved_at
        state.window, state.nan_skipped, state.nan_in_a_row = window.snapshot(), skipped, in_a_row
        recorder.save_checkpoint(which, make(components, state))
        if which == "last":
            saved_at = state.iteration

    def kept() -> str:
        if saved_at is None:
            return "no checkpoint was written yet"
        return f"checkpoints/last.pt holds iteration {saved_at}, the last good state"

    components.algorithm.train()
    training = STOPPER.during("meta-training", graceful=True)  # a first signal: a request
    with progress_bar(total, state.iteration) as bar, training:
        while state.iteration < total:
            step = meta_step(components, cfg.grad_clip, cfg.grad_clamp)
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
                means = dict(record)
                recorder.log_metrics(
                    {
                        "iteration": it,
                        "split": "train",
                        **record,
                        "metric_name": name,
                        **learning_rates(components),
                        **({"nan_skipped": skipped} if skipped else {}),
                        "it_per_s": speed,
                        "wall_time": state.wall_time,
                    }
                )
                bar.update(it, loss=record["loss"], **{f"val_{name}": val_metric})
            if logged or progress.due(it):
                rate = progress.update(it)
                eta = progress.eta(it)
                crowded = watch.check(rate)
                if crowded:
                    log.warning(crowded)
                # between train lines, the means of the line being summed
                shown = means if logged or not window.count else window.means()
                progress_log.info(
                    "iter %d/%d  %s  val %s %s  %.2f it/s  eta %s",
                    it,
                    total,
                    described(shown, name),
                    name,
                    "-" if val_metric is None else f"{val_metric:.4f}",
                    rate or 0.0,
                    "-" if eta is None else hms(eta),
                )
                note = progress.long_run_note(it)
                if note:
                    log.warning(note)
                bar.update(it, **{"it/s": round(rate or 0.0, 2)})
            if it % cfg.val_every == 0 or it == total:
                began = time.perf_counter()
                with STOPPER.during("validation", graceful=True):
                    val = evaluate(
                        components,
                        "val",
                        components.run.val.num_tasks,
                        components.run.val.batch_size,
                    )
                state.eval_time += time.perf_counter() - began
                progress.evaluated(time.perf_counter() - began)
                val_metric = val.final
                improved = is_better(
                    components.task.higher_is_better,
                    val.final,
                    val.diverged,
                    state.best_metric,
                    state.best_diverged,
                )
                if improved:
                    state.best_metric, state.best_iteration = val.final, it
                    state.best_diverged = val.diverged
                hooked = components.algorithm.on_validation(it, val.final)
                extra = {**learning_rates(components), **hooked, "wall_time": state.wall_time}
                evaluation.log(components, recorder, val, it, "val", **extra)
                write_artifacts(components, recorder)
                (log.warning if val.diverged else log.info)(
                    "iter %d: val %s %s (before adaptation %.4f)%s",
                    it,
                    name,
                    val.describe(),
                    val.metric_mean[0],
                    "  [best]" if improved else "",
                )
                if improved:
                    save("best")
                keep_top(components, recorder, state, it, val)
            if it == total:
                ended = components.algorithm.on_train_end(it)
                if ended:
                    recorder.log_metrics({"iteration": it, "split": "train_end", **ended})
                write_artifacts(components, recorder)
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


def keep_top(
    components: Components, recorder: Recorder, state: LoopState, it: int, val: EvalSummary
) -> None:
    """Keep the ``test.ensemble_top_k`` best validation checkpoints (MAML++'s code keeps
    its 5 best epochs and averages their predictions at the meta-test). Ties keep the
    earlier; a validation in which a task diverged is never kept."""
    k = components.run.test.ensemble_top_k
    if k < 2 or val.diverged or not math.isfinite(val.final):
        return
    entry = [val.final, it]
    ranked = sorted(
        [*state.top, entry], key=lambda e: e[0], reverse=components.task.higher_is_better
    )
    kept, dropped = ranked[:k], ranked[k:]
    if entry not in kept:
        return
    state.top = sorted(kept, key=lambda e: e[1])
    recorder.save_checkpoint(top_name(it), make(components, state))
    for _, old in dropped:
        recorder.remove_checkpoint(top_name(int(old)))


SHOWN_TERMS = 4  # named terms a progress line shows; metrics.jsonl holds them all


def described(means: dict[str, float], metric_name: str) -> str:
    """A progress line's training part: the loss, the metric where it is not the loss
    itself, and the named terms (``MetaLoss.terms``), the first few of many."""
    if "loss" not in means:
        return "loss -"
    parts = [f"loss {means['loss']:.4f}"]
    if "metric" in means and means["metric"] != means["loss"]:
        parts.append(f"{metric_name} {means['metric']:.4f}")
    terms = [k for k in means if k not in ("loss", "metric")]
    parts += [f"{k} {means[k]:.4g}" for k in terms[:SHOWN_TERMS]]
    if len(terms) > SHOWN_TERMS:
        parts.append(f"+{len(terms) - SHOWN_TERMS} terms in metrics.jsonl")
    return "  ".join(parts)


class Window:
    """Train-line statistics over the iterations since the last log line (kept on the
    device until logged, so logging does not synchronise every step)."""

    def __init__(self, snapshot: dict[str, Any] | None = None) -> None:
        """A new window, or the one a checkpoint holds (``snapshot``)."""
        self.sums: dict[str, Tensor] = {}
        self.reset()
        if snapshot:
            self.sums = {key: value.clone() for key, value in snapshot["sums"].items()}
            self.count = int(snapshot["count"])

    def reset(self) -> None:
        self.sums = {}
        self.count, self.start = 0, time.perf_counter()

    def mean(self, key: str) -> float | None:
        """The mean of ``key`` over the window so far (without starting a new one)."""
        total = self.sums.get(key)
        return None if total is None or not self.count else (total / self.count).item()

    def means(self) -> dict[str, float]:
        """Every mean of the window so far (without starting a new one)."""
        return {key: (total / self.count).item() for key, total in self.sums.items()}

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint keeps of the window: its count and sums (as they are)."""
        return {"count": self.count, "sums": {k: v.clone() for k, v in self.sums.items()}}

    def add(self, step: MetaLoss) -> None:
        values = {"loss": step.loss, "metric": step.metric, **step.terms}
        for key, value in values.items():
            total = self.sums.get(key)
            value = value.detach()
            # (a checkpoint's sums are read onto the CPU)
            self.sums[key] = value if total is None else total.to(value.device) + value
        self.count += 1

    def record(self, iteration: int) -> dict[str, float]:
        """Window means (loss, metric, every named term) and it/s; starts a new window."""
        speed = self.count / (time.perf_counter() - self.start)
        means = {key: (value / self.count).item() for key, value in self.sums.items()}
        self.reset()
        return {**means, "it_per_s": speed}
