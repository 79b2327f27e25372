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

    def __init__(self, cfg: AlgoConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.task = task

    @property
    def batching(self) -> str:
        """The per-task strategy in use; ``auto`` asks the model, for the current device."""
        if self.cfg.batching != "auto":
            return self.cfg.batching
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        return self.model.batching_for(device)

    def observe(self, batch: TaskBatch) -> None:
        """After each outer step: let ``running`` batch norm see the training inputs."""
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
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outputs, strict=True))
        return torch.stack(outputs)
