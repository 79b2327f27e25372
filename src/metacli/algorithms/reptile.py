"""Reptile (Nichol et al. 2018): move the initialisation toward the adapted weights.

Each task is adapted with ``inner_steps`` steps of the update rule (plain SGD: the
paper's) on all its examples, to weights phi, with no second-order term; the outer
update is ``theta + eps * (mean_tasks(phi) - theta)``. It is expressed as the gradient
``theta - mean(phi)`` of a surrogate loss, so the configured outer optimizer applies it:
with ``optim=sgd optim.momentum=0 optim.lr=eps`` this is exactly the Reptile step, and
``optim.scheduler=linear`` anneals eps to ``optim.min_lr`` as in the paper
(``experiment=reptile_sinusoid``); with Adam it is the Adam variant the paper also
discusses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metacli.algorithms.base import Adaptive, AdaptiveConfig, AlgoConfig, MetaLoss
from metacli.engine.inner import last
from metacli.engine.random import TaskRandom
from metacli.tasks.base import TaskBatch
from metacli.updates.base import Params


@dataclass
class ReptileConfig(AdaptiveConfig):
    name: str = "reptile"
    inner_steps: int = 5


class Reptile(Adaptive, key="reptile"):
    Config: ClassVar[type[AlgoConfig]] = ReptileConfig
    trains_rule = False  # theta - phi reaches the initialisation only

    @property
    def exact_gradient(self) -> bool:
        return False  # theta - mean(phi) is not the gradient of a loss of theta

    def adapted_weights(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Params, Tensor]:
        """phi of one task: the inner loop on all its examples (Reptile does not split them)."""
        x, y = TaskBatch.joined(sx, qx), TaskBatch.joined(sy, qy)
        phi = last(self.adapt(params, x, y, self.train_steps, self.train_lr, True, rng))
        prediction = self.forward_with(phi.params, qx, phi.index)
        return phi.params, self.task.metric(prediction, qy)

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        theta = self.initial_params()
        detached = {n: p.detach() for n, p in theta.items()}
        phi, metrics = self.executor.map(
            self.adapted_weights, batch.keys, (detached,), batch.tensors()
        )  # phi: {name: [B, *shape]}
        # d/dtheta of 0.5 * ||theta - mean(phi)||^2 is theta - mean(phi).
        loss = sum(0.5 * (theta[n] - phi[n].mean(0).detach()).pow(2).sum() for n in theta)
        return MetaLoss(torch.as_tensor(loss), metrics.detach())
