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

import functools
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

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        return reptile_loss(self, batch)


def reptile_phi(
    algorithm: Adaptive,
    rng: TaskRandom,
    params: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
) -> tuple[Params, Tensor]:
    """phi of one task: the inner loop on all its examples (Reptile does not split them),
    and the query metric there."""
    x, y = TaskBatch.joined(sx, qx), TaskBatch.joined(sy, qy)
    phi = last(algorithm.adapt(params, x, y, algorithm.train_steps, algorithm.train_lr, True, rng))
    prediction = algorithm.forward_with(phi.params, qx, phi.index)
    return phi.params, algorithm.task.metric(prediction, qy)


def reptile_loss(algorithm: Adaptive, batch: TaskBatch) -> MetaLoss:
    """A surrogate whose gradient is theta - mean(phi), for any adaptive algorithm (Reptile,
    and MetaNAS's Reptile meta-learner)."""
    theta = algorithm.initial_params()
    detached = {n: p.detach() for n, p in theta.items()}
    phi, metrics = algorithm.executor.map(
        functools.partial(reptile_phi, algorithm), batch.keys, (detached,), batch.tensors()
    )  # phi: {name: [B, *shape]}
    # d/dtheta of 0.5 * ||theta - mean(phi)||^2 is theta - mean(phi).
    loss = sum(0.5 * (theta[n] - phi[n].mean(0).detach()).pow(2).sum() for n in theta)
    return MetaLoss(torch.as_tensor(loss), metrics.detach())
