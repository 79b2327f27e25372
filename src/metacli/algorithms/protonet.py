"""Prototypical Networks (Snell et al. 2017).

Each class is represented by the mean embedding of its support examples (its
prototype); a query's logits are minus its squared Euclidean distances to the
prototypes. There is no inner loop, so ways may differ between training and testing
(``task.ways`` vs ``task.test_ways``; Snell et al. trained Omniglot with 60 ways).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.base import AlgoConfig, Evaluation, MetaAlgorithm
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import ClassificationTask, TaskBatch, TaskDistribution


@dataclass
class ProtoNetConfig(AlgoConfig):
    name: str = "protonet"


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """Embeddings support [S, D], query [Q, D], labels [S] -> logits [Q, ways]."""
    one_hot = F.one_hot(support_y, ways).to(support.dtype)  # [S, ways]
    prototypes = one_hot.T @ support / one_hot.sum(0).unsqueeze(1)  # [ways, D]
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(MetaAlgorithm, key="protonet"):
    inner_loop = False  # an episode is one forward pass; nothing is adapted
    Config: ClassVar[type[AlgoConfig]] = ProtoNetConfig
    uses_head = False

    def __init__(self, cfg: ProtoNetConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        if not isinstance(task, ClassificationTask):
            raise ConfigError(
                f"algo=protonet classifies; task={task.cfg.name} is not a "
                f"classification task. Choose a classification task."
            )
        self.classes = task

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, ways: int
    ) -> tuple[Tensor, Tensor]:
        # One forward pass over support and query together, as in Snell et al.'s code.
        embeddings = self.model(torch.cat([support_x, query_x]))
        support, query = embeddings[: len(support_x)], embeddings[len(support_x) :]
        logits = prototype_logits(support, support_y, query, ways)
        return self.task.loss(logits, query_y), self.task.metric(logits, query_y)

    def episodes(self, ways: int) -> Callable[..., tuple[Tensor, Tensor]]:
        """``task_loss`` with ``map_tasks``'s signature (ProtoNet has no adapted params)."""

        def one(_: None, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self.task_loss(sx, sy, qx, qy, ways)

        return one

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        return self.mean_loss(self.episodes(self.classes.ways("train")), None, batch)

    def evaluate(self, batch: TaskBatch) -> Evaluation:
        with torch.no_grad():
            losses, metrics = self.map_tasks(self.episodes(self.classes.ways("test")), None, batch)
        return Evaluation(loss=losses.unsqueeze(1), metric=metrics.unsqueeze(1))  # [B, 1]
