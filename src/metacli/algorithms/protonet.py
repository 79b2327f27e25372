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

from metacli.algorithms.base import (
    AlgoConfig,
    Evaluation,
    MetaAlgorithm,
    MetaLoss,
    classification_task,
)
from metacli.models.base import Model
from metacli.models.fused import backward_once
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution

Episode = Callable[..., tuple[Tensor, Tensor, dict[str, Tensor]]]


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
        self.classes = classification_task(task, cfg.name)

    def logits(self, sx: Tensor, sy: Tensor, qx: Tensor, ways: int) -> Tensor:
        # One forward pass over support and query together, as in Snell et al.'s code.
        # The shared module itself (its weights are the meta-parameters; nothing is swapped).
        embeddings = self.model(torch.cat([sx, qx]))
        support, query = embeddings[: len(sx)], embeddings[len(sx) :]
        return prototype_logits(support, sy, query, ways)

    def episodes(self, ways: int) -> Episode:
        """One episode's loss, metric and (no) terms, with the executor's signature."""

        def one(
            rng: TaskRandom, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
        ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            with backward_once():  # the episode's loss is backpropagated once
                logits = self.logits(sx, sy, qx, ways)
            return self.task.loss(logits, qy), self.task.metric(logits, qy), {}

        return one

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        return self.mean_over_tasks(self.episodes(self.classes.ways("train")), batch)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        ways = self.classes.ways("test")

        def one(
            rng: TaskRandom, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
        ) -> tuple[Tensor, ...]:
            with backward_once():  # (no graph at all)
                logits = self.logits(sx, sy, qx, ways)
            return self.task.loss(logits, qy), self.task.metric(logits, qy), logits

        with torch.no_grad():
            loss, metric, logits = self.executor.map(one, batch.keys, (), batch.tensors())
        return Evaluation(
            loss.unsqueeze(1), metric.unsqueeze(1), logits.unsqueeze(1) if predictions else None
        )  # [B, 1] ...
