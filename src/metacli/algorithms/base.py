"""The small contract every algorithm meets, and the per-task map it is computed with.

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters (the model's
initialisation, plus whatever else it meta-learns). The one training loop only calls
``meta_loss`` (backpropagated, then an outer optimizer step) and ``evaluate`` (adapt on
the support set, report the query metric after each inner step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from metacli.config import require
from metacli.models.base import Model
from metacli.registry import Registered
from metacli.tasks.base import TaskBatch, TaskDistribution

BATCHING = ("auto", "vmap", "loop")


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
        return self.model.batching_for(device)

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
        return self.per_task(
            fn,
            (None, 0, 0, 0, 0),
            params,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            batch.query_y,
        )

    def per_task(self, fn: Callable[..., Any], in_dims: Sequence[int | None], *args: Any) -> Any:
        """Apply ``fn`` to each task (args with in_dim 0 are sliced on axis 0) and stack.

        ``vmap`` runs every task in one batched computation; ``loop`` is the plain Python
        loop over tasks. Both give the same numbers; which is faster depends on model and
        device (see ``Model.preferred_batching``).
        """
        if self.batching == "vmap":
            return torch.func.vmap(fn, in_dims=tuple(in_dims))(*args)
        size = next(a.shape[0] for a, d in zip(args, in_dims, strict=True) if d == 0)
        outputs = [
            fn(*(a[i] if d == 0 else a for a, d in zip(args, in_dims, strict=True)))
            for i in range(size)
        ]
        flat = [tree_flatten(output) for output in outputs]
        leaves = [torch.stack(parts) for parts in zip(*(f[0] for f in flat), strict=True)]
        return tree_unflatten(leaves, flat[0][1])  # same structure as vmap returns
