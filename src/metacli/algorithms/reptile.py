"""Reptile (Nichol et al. 2018): move the initialisation toward the adapted weights.

Each task is adapted with ``inner_steps`` steps of plain SGD (no second-order term) to
weights phi; the outer update is ``theta + eps * (mean_tasks(phi) - theta)``. It is
expressed as the gradient ``theta - mean(phi)`` of a surrogate loss, so the configured
outer optimizer applies it: with ``optim=sgd optim.momentum=0 optim.lr=eps`` this is
exactly the Reptile step, and ``optim.scheduler=linear`` anneals eps to ``optim.min_lr``
as in the paper (``experiment=reptile_sinusoid``); with Adam it is the Adam variant the
paper also discusses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, GradientConfig, Params
from metacli.tasks.base import TaskBatch


@dataclass
class ReptileConfig(GradientConfig):
    name: str = "reptile"
    inner_steps: int = 5


class Reptile(MAML, key="reptile"):
    Config: ClassVar[type[AlgoConfig]] = ReptileConfig

    def adapted_weights(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Params, Tensor]:
        """phi of one task: SGD on all its examples (Reptile does not split them)."""
        x, y = TaskBatch.joined(support_x, query_x), TaskBatch.joined(support_y, query_y)
        phi = self.adapt(params, x, y, self.train_steps, self.train_lr, first_order=True)
        prediction = self.forward_with(phi, query_x, self.train_steps)
        return phi, self.task.metric(prediction, query_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        theta = self.initial_params()
        detached = {n: p.detach() for n, p in theta.items()}
        phi, metrics = self.map_tasks(
            self.adapted_weights, detached, batch
        )  # phi: {name: [B, *shape]}
        # d/dtheta of 0.5 * ||theta - mean(phi)||^2 is theta - mean(phi).
        loss = sum(0.5 * (theta[n] - phi[n].mean(0).detach()).pow(2).sum() for n in theta)
        return torch.as_tensor(loss), metrics.detach()
