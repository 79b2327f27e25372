"""The per-task executor: one function, computed for every task of a meta-batch.

Contract (what a task function may assume, and must respect):

- It is called as ``fn(rng, *shared, *per_task)`` for ONE task. ``shared`` arguments
  (the meta-parameters, say) are the same for every task; ``per_task`` tensors are
  sliced on axis 0 (a ``TaskBatch`` gives its four tensors). It returns tensors or
  nested dicts/tuples of tensors, which come back stacked on a new axis 0, in task order.
- ``rng`` is the task's own random stream (``metacli.streams.TaskRandom``), keyed
  by the seed, the stream (train/val/test), the iteration and the task's index only. It
  is the only source of randomness allowed: a draw from torch's global generator is an
  error under every strategy (vmap would refuse it; a loop or threads would make the
  numbers depend on the strategy and the thread order). Whoever draws from it (the
  algorithm, its update rule or its model) declares ``stochastic = True``; otherwise
  the streams are not passed in (under vmap they would cost an input) and a draw is an
  error naming that setting, again under every strategy.
- The strategy is ``vmap`` (one batched ``torch.func`` computation), ``loop`` (a Python
  loop) or ``threads`` (that loop over one single-threaded worker per core). All give the
  same numbers; which is fastest depends on the model and device
  (``Model.preferred_batching``, measured in docs/benchmarks.md). Under vmap a function
  must use ``torch.func``-compatible operations and no data-dependent Python control flow.
- With ``threads``, the module to call is ``module()``: each worker has its own copy of
  the structure, since ``functional_call`` swaps a module's tensors while it runs.
- ``compile`` (``algo.compile=true``) runs the training computation through
  ``torch.compile``: under vmap the batched function, otherwise each task's function
  (its inner gradients then come from ``torch.func``, which the compiler traces). The
  first call compiles (``compile_seconds``); a function the compiler cannot take runs
  eagerly from then on, said once in the log. Evaluation (no gradients) stays eager;
  with ``threads`` the compiled tasks run one after another in the calling thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from metacli.errors import MetacliError
from metacli.models.base import Model
from metacli.streams import TaskRandom, task_keys

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "vmap", "loop", "threads")
GLOBAL_RNG = (
    "A task function drew from torch's global random generator. Inside a task, draw from "
    "the task's own stream (the rng argument: rng.normal(shape), rng.uniform(shape), ...), "
    "so that its numbers are the same under algo.batching=vmap, loop and threads."
)


class Carry(torch.autograd.Function):
    """A scalar whose gradient to each leaf was computed already: one node for autograd to
    walk, which hands each leaf its gradient times the incoming one."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: Sequence[Tensor], *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, *outer: Tensor) -> Any:
        return (None, None, *(g * outer[0] for g in ctx.grads))


def carrying(value: Tensor, leaves: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``value`` as a scalar whose gradient to each of ``leaves`` is the given one."""
    assert len(leaves) == len(grads)
    if not leaves:
        return value.detach()
    return Carry.apply(value, list(grads), *leaves)


class TaskExecutor:
    """Computes per-task functions over a meta-batch with the chosen strategy."""

    def __init__(
        self,
        choice: str,
        model: Model,
        inner_loop: bool = True,
        compile: bool = False,
        keeps_graphs: bool = True,
    ) -> None:
        self.choice = choice
        self.compile = compile
        self.compiled: dict[Any, Callable[..., Any]] = {}  # per task function
        self.compile_seconds = 0.0  # spent in first calls, compiling
        self.fallback: str | None = None  # why compilation was given up, if it was
        self.model = model
        # Without an inner loop each task is one large batch with enough work per
        # operation for every core, so `auto` takes the plain loop where the model
        # prefers threads (measured: docs/benchmarks.md).
        self.inner_loop = inner_loop
        self.keeps_graphs = keeps_graphs  # in training; the model's choice may depend on it
        self.stochastic = False  # whether tasks draw from their streams (set by the owner)
        self.workers: TaskThreads | None = None
        # A parameter stays the same object when the model moves to another device, so
        # its .device always tells where the model is (read often: keep it cheap).
        self.anchor = next(model.parameters(), None)

    @property
    def strategy(self) -> str:
        """The strategy in use; ``auto`` asks the model, for the device of its weights."""
        if self.choice != "auto":
            return self.choice
        device = self.anchor.device if self.anchor is not None else torch.device("cpu")
        # (evaluation, under no_grad, holds no graph between a task's steps)
        holds = self.keeps_graphs and torch.is_grad_enabled()
        preferred = self.model.batching_for(device, holds)
        return "loop" if preferred == "threads" and not self.inner_loop else preferred

    @property
    def functional(self) -> bool:
        """Whether task functions run under ``vmap``."""
        return self.strategy == "vmap"

    @property
    def compiling(self) -> bool:
        """Whether the computation in progress goes through ``torch.compile`` (training
        with ``algo.compile=true``, until a compilation failed)."""
        return self.compile and self.fallback is None and torch.is_grad_enabled()

    @property
    def functional_grads(self) -> bool:
        """Whether inner gradients must come from ``torch.func`` (vmap, or compiled code,
        which traces ``torch.func`` but not ``torch.autograd.grad``); else plain autograd."""
        return self.functional or self.compiling

    def module(self) -> Model:
        """The model to ``functional_call`` from the current thread."""
        if self.workers is None:
            return self.model
        return self.workers.replicas.get(threading.current_thread(), self.model)

    def map(
        self,
        fn: Callable[..., Any],
        keys: Tensor | None,
        shared: Sequence[Any],
        per_task: Sequence[Tensor],
    ) -> Any:
        """``fn(rng, *shared, *task_slices)`` for every task, outputs stacked on axis 0."""
        keys = self.stream_keys(keys, per_task)
        if self.strategy == "vmap":
            if self.compiling:
                return self.compiled_call(fn, self._vmap, fn, keys, shared, per_task)
            return self._vmap(fn, keys, shared, per_task)
        outputs = list(self._each(self._maybe_compiled(fn), keys, shared, per_task))
        flat = [tree_flatten(output) for output in outputs]
        leaves = [torch.stack(parts) for parts in zip(*(f[0] for f in flat), strict=True)]
        return tree_unflatten(leaves, flat[0][1])  # the structure vmap returns

    def mean(
        self,
        fn: Callable[..., tuple[Tensor, Tensor, dict[str, Tensor]]],
        keys: Tensor | None,
        shared: Sequence[Any],
        per_task: Sequence[Tensor],
        leaves: list[Tensor],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Mean over tasks of the loss ``fn`` returns, each task's metric [B], and the mean
        of each named term.

        ``fn`` returns (loss, metric, terms) for one task. Without vmap each task's loss
        is backpropagated to ``leaves`` as soon as it is computed (by its worker, with
        threads), so only one task's graph per worker is held, not the meta-batch's;
        the returned scalar then carries the summed gradient, added in task order so
        runs stay reproducible.
        """
        if self.strategy == "vmap" or not torch.is_grad_enabled() or not leaves:
            losses, metrics, terms = self.map(fn, keys, shared, per_task)
            return losses.mean(), metrics.detach(), {k: v.detach().mean() for k, v in terms.items()}
        size = per_task[0].shape[0]
        task = self._maybe_compiled(fn)

        def one(*args: Any) -> tuple[Tensor, Tensor, dict[str, Tensor], tuple[Tensor, ...]]:
            loss, metric, terms = task(*args)
            grads = torch.autograd.grad(
                loss / size, leaves, allow_unused=True, materialize_grads=True
            )
            detached = {k: v.detach() for k, v in terms.items()}
            return loss.detach(), metric.detach(), detached, grads

        losses, metrics, terms = [], [], []
        total: list[Tensor] | None = None
        for loss, metric, named, grads in self._each(
            one, self.stream_keys(keys, per_task), shared, per_task
        ):
            losses.append(loss)
            metrics.append(metric)
            terms.append(named)
            total = (
                list(grads) if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            )
        assert total is not None
        means = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}
        return carrying(torch.stack(losses).mean(), leaves, total), torch.stack(metrics), means

    # --- strategies -------------------------------------------------------------------
    def stream_keys(self, keys: Tensor | None, per_task: Sequence[Tensor]) -> Tensor | None:
        """Each task's stream key (None where tasks draw nothing; fixed ones for a batch
        that has none)."""
        if not self.stochastic:
            return None
        if keys is not None:
            return keys
        first = per_task[0]
        return task_keys(0, "unkeyed", 0, 0, first.shape[0], first.device)

    @staticmethod
    def _vmap(
        fn: Callable[..., Any],
        keys: Tensor | None,
        shared: Sequence[Any],
        per_task: Sequence[Tensor],
    ) -> Any:
        def task(key: Tensor | None, *args: Any) -> Any:
            return fn(TaskRandom(key), *args)

        in_dims = (None if keys is None else 0, *([None] * len(shared)), *([0] * len(per_task)))
        try:
            return torch.func.vmap(task, in_dims=in_dims)(keys, *shared, *per_task)
        except RuntimeError as err:
            if "randomness" in str(err):
                raise MetacliError(GLOBAL_RNG) from None
            raise

    def _each(
        self,
        fn: Callable[..., Any],
        keys: Tensor | None,
        shared: Sequence[Any],
        per_task: Sequence[Tensor],
    ) -> Iterator[Any]:
        """``fn`` on each task, in task order: in the worker threads with ``threads``
        (a single task stays in this thread, where it can use every core), else here."""
        tasks = [
            (TaskRandom(None if keys is None else keys[i]), *shared, *(t[i] for t in per_task))
            for i in range(per_task[0].shape[0])
        ]
        before = torch.get_rng_state()
        # compiled code runs in this thread: a worker's lookup of its replica would break
        # the compiled graph (threading is opaque to the compiler)
        if self.strategy != "threads" or len(tasks) == 1 or self.compiling:
            results: Iterator[Any] = (fn(*args) for args in tasks)
        else:
            if self.workers is None:
                self.workers = TaskThreads(self.model)
            self.workers.sync(self.model)
            grad_enabled = torch.is_grad_enabled()

            def call(args: tuple[Any, ...]) -> Any:
                with torch.set_grad_enabled(grad_enabled):  # grad mode is per thread
                    return fn(*args)

            results = self.workers.pool.map(call, tasks)
        yield from results
        if not torch.equal(before, torch.get_rng_state()):
            raise MetacliError(GLOBAL_RNG)

    # --- compilation ------------------------------------------------------------------------
    def compiled_call(self, key: Any, body: Callable[..., Any], *args: Any) -> Any:
        """``body(*args)`` through ``torch.compile``, cached by ``key`` (the task function).

        Compiled code always runs in the calling thread (see ``_each``). The first call
        compiles (timed); after a failure everything runs eagerly, said once."""
        ident = (getattr(key, "__func__", key), id(getattr(key, "__self__", None)))
        compiled = self.compiled.get(ident)
        if compiled is not None:
            return compiled(*args)
        if self.fallback is not None:
            return body(*args)
        start = time.perf_counter()
        try:
            import torch._dynamo  # (takes seconds: imported only here)

            compiled = torch.compile(body)
            result = compiled(*args)
        except MetacliError:  # the task's own error, not the compiler's
            raise
        except Exception as err:  # the compiler's errors share no base class
            self.give_up(err)
            return body(*args)
        self.compile_seconds += time.perf_counter() - start
        self.compiled[ident] = compiled
        log.info("algo.compile: compiled in %.1f s", self.compile_seconds)
        return result

    def _maybe_compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` for one task, through the compiler while ``compiling``."""
        if not self.compiling:
            return fn

        def call(*args: Any) -> Any:
            return self.compiled_call(fn, fn, *args)

        return call

    def give_up(self, err: Exception) -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.fallback = f"{type(err).__name__}: {first[:300]}"
        log.warning(
            "algo.compile=true: torch.compile could not compile this computation (%s); "
            "running it eagerly, with the same numbers. Set algo.compile=false to skip "
            "the attempt.",
            self.fallback,
        )


class TaskThreads:
    """A pool of single-threaded workers, one per CPU thread torch may use.

    On a CPU, small convolutions parallelise poorly inside one operator (two threads make
    one task far less than twice as fast: docs/benchmarks.md), so computing two tasks at a
    time, one core each, beats one task at a time on two cores.
    """

    def __init__(self, model: Model) -> None:
        size = max(1, torch.get_num_threads())
        self.replicas: dict[threading.Thread, Model] = {}
        self.template = model
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(size, "metacli-task", initializer=self._start)

    def _start(self) -> None:
        torch.set_num_threads(1)  # per thread: leaves the main thread's setting alone
        replica = copy.deepcopy(self.template)
        with self.lock:
            self.replicas[threading.current_thread()] = replica

    def sync(self, model: Model) -> None:
        """Train/eval mode is read from the module, so the replicas must follow it."""
        for replica in list(self.replicas.values()):
            replica.train(model.training)
