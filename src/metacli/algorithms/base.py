"""The small contract every algorithm meets, and the per-task map it is computed with.

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters (the model's
initialisation, plus whatever else it meta-learns). The one training loop only calls
``meta_loss`` (backpropagated, then an outer optimizer step) and ``evaluate`` (adapt on
the support set, report the query metric after each inner step).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from metacli.config import require
from metacli.models.base import Model
from metacli.registry import Registered
from metacli.tasks.base import TaskBatch, TaskDistribution

BATCHING = ("auto", "vmap", "loop", "threads")


@dataclass
class AlgoConfig:
    name: str = ""
    batching: str = "auto"

    def __post_init__(self) -> None:
        require(
            self.batching in BATCHING,
            "algo.batching",
            self.batching,
            f"choose one of {', '.join(BATCHING)}",
        )


@dataclass
class Evaluation:
    """Query loss and metric of each task after 0..k inner steps."""

    loss: Tensor  # [B, k+1]
    metric: Tensor  # [B, k+1]


class MetaAlgorithm(nn.Module, Registered):
    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type[AlgoConfig]] = AlgoConfig
    uses_head: ClassVar[bool] = True  # False: the model is built without its linear head
    # False: meta_loss computes each task as one forward/backward over all its examples
    # (ProtoNet, pretraining). Each operation then has enough work for all cores, so on
    # a CPU `auto` takes the plain loop where the model prefers threads (measured:
    # docs/benchmarks.md).
    inner_loop: ClassVar[bool] = True
    outer_steps: Tensor

    def __init__(self, cfg: AlgoConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.task = task
        # Outer steps taken; a buffer, so schedules inside algorithms survive a resume.
        self.register_buffer("outer_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        """Adjust the model or outer-optimizer settings an algorithm needs, before building.

        Returns one line per change, for the log. MAML++ uses it for per-step batch
        norm and cosine annealing of the outer learning rate.
        """
        return []

    @property
    def batching(self) -> str:
        """The per-task strategy in use; ``auto`` asks the model, for the current device."""
        if self.cfg.batching != "auto":
            return self.cfg.batching
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        preferred = self.model.batching_for(device)
        return "loop" if preferred == "threads" and not self.inner_loop else preferred

    def observe(self, batch: TaskBatch) -> None:
        """After each outer step: count it; let ``running`` batch norm see the inputs."""
        self.outer_steps += 1
        if self.model.tracks_running_stats:
            self.model.update_running_stats(batch.support_x)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Scalar loss whose gradient is the meta-gradient, and the per-task query metric [B]."""
        raise NotImplementedError

    def evaluate(self, batch: TaskBatch) -> Evaluation:
        """Adapt to each task's support set; measure the query set after every inner step."""
        raise NotImplementedError

    def inner_learning_rates(self) -> dict[str, float]:
        """Learning rates worth logging besides the outer optimizer's."""
        return {}

    def map_tasks(self, fn: Callable[..., Any], params: Any, batch: TaskBatch) -> Any:
        """``fn(params, support_x, support_y, query_x, query_y)`` for every task, stacked."""
        return self.per_task(fn, TASK_DIMS, params, *batch.tensors())

    def mean_loss(self, fn: Callable[..., Any], params: Any, batch: TaskBatch) -> Any:
        """Mean over tasks of the loss ``fn`` returns (with ``map_tasks``'s arguments), and
        each task's metric [B].

        Without ``vmap`` each task's loss is backpropagated as soon as it is computed
        (by its worker, with ``threads``, so the backward pass, most of a second-order
        meta-iteration, runs in parallel too): only one task's graph per worker is held,
        not the whole meta-batch's. The returned scalar then carries the summed gradient,
        added in task order so runs stay reproducible.
        """
        if self.batching == "vmap" or not torch.is_grad_enabled():
            losses, metrics = self.map_tasks(fn, params, batch)
            return losses.mean(), metrics.detach()
        leaves = [p for p in self.parameters() if p.requires_grad]
        size = len(batch)

        def one(*args: Any) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
            loss, metric = fn(*args)
            grads = torch.autograd.grad(
                loss / size, leaves, allow_unused=True, materialize_grads=True
            )
            return loss.detach(), metric.detach(), grads

        losses, metrics, total = [], [], None
        for loss, metric, grads in self._each(one, TASK_DIMS, (params, *batch.tensors())):
            losses.append(loss)
            metrics.append(metric)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        assert total is not None
        # (p - p.detach()) is exactly zero, so the value is the mean loss; its gradient is total.
        carrier = sum(((p - p.detach()) * g).sum() for p, g in zip(leaves, total, strict=True))
        return torch.stack(losses).mean() + carrier, torch.stack(metrics)

    def per_task(self, fn: Callable[..., Any], in_dims: Sequence[int | None], *args: Any) -> Any:
        """Apply ``fn`` to each task (args with in_dim 0 are sliced on axis 0) and stack.

        ``vmap`` runs every task in one batched computation; ``loop`` is the plain Python
        loop over tasks; ``threads`` is that loop spread over one worker thread per CPU
        core, each task computed whole by one single-threaded worker. All give the same
        numbers; which is fastest depends on model and device (``Model.preferred_batching``).
        """
        if self.batching == "vmap":
            return torch.func.vmap(fn, in_dims=tuple(in_dims))(*args)
        outputs = list(self._each(fn, in_dims, args))
        flat = [tree_flatten(output) for output in outputs]
        leaves = [torch.stack(parts) for parts in zip(*(f[0] for f in flat), strict=True)]
        return tree_unflatten(leaves, flat[0][1])  # same structure as vmap returns

    def replica(self) -> Model:
        """The model to call ``functional_call`` on from the current thread.

        ``functional_call`` swaps a module's tensors while it runs, and per-step batch
        norm is told its step by an attribute, so concurrent tasks must not share one
        module: each worker thread gets its own copy of the structure (its own weights are
        never used; the caller passes every parameter and buffer).
        """
        workers = self.__dict__.get("_workers")
        if workers is None or threading.current_thread() not in workers.replicas:
            return self.model
        return workers.replicas[threading.current_thread()]

    def _each(
        self, fn: Callable[..., Any], in_dims: Sequence[int | None], args: Sequence[Any]
    ) -> Iterator[Any]:
        """``fn`` on each task, in task order: in the worker threads with ``threads``
        (a single task stays in this thread, where it can use every core), else here."""
        tasks = list(slices(in_dims, args))
        if self.batching != "threads" or len(tasks) == 1:
            return (fn(*task_args) for task_args in tasks)
        workers = self.__dict__.get("_workers")
        if workers is None:
            workers = self.__dict__["_workers"] = TaskThreads(self.model)
        workers.sync(self.model)
        grad_enabled = torch.is_grad_enabled()

        def call(task_args: tuple[Any, ...]) -> Any:
            with torch.set_grad_enabled(grad_enabled):  # grad mode is per thread
                return fn(*task_args)

        return workers.pool.map(call, tasks)


TASK_DIMS = (None, 0, 0, 0, 0)  # map_tasks: params shared, batch tensors split by task


def slices(in_dims: Sequence[int | None], args: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """The arguments of each task: those with in_dim 0 indexed by task, the rest shared."""
    size = next(a.shape[0] for a, d in zip(args, in_dims, strict=True) if d == 0)
    for i in range(size):
        yield tuple(a[i] if d == 0 else a for a, d in zip(args, in_dims, strict=True))


class TaskThreads:
    """A pool of single-threaded workers, one per CPU thread torch may use.

    On a CPU, small convolutions parallelise poorly inside one operator (measured: 2
    threads make one task 1.5x faster, not 2x), so computing two tasks at a time, one
    core each, beats one task at a time on two cores.
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
