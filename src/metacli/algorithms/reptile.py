"""Reptile (Nichol et al. 2018): move the initialisation toward the adapted weights.

Each task is adapted with ``inner_steps`` steps of the update rule on all its examples
(support and query together: Reptile does not split them), to weights phi, with no
second-order term; the outer update is ``theta + eps * (mean_tasks(phi) - theta)``. It is
expressed as the gradient ``theta - mean(phi)`` of a surrogate loss, so the configured
outer optimizer applies it: with ``optim=sgd optim.momentum=0 optim.lr=eps`` this is
exactly the Reptile step, and ``optim.scheduler=linear`` anneals eps to ``optim.min_lr``
as in the paper; with Adam it is the Adam variant the paper also discusses.

The paper's classification protocol (openai/supervised-reptile, ``experiment=reptile_*``):
the inner loop is Adam with beta1 = 0 (``algo.update=adam``) on mini-batches
(``algo.inner_batch``; ``algo.test_inner_batch`` at evaluation), and its TF Adam is ONE
optimizer for the whole run, so its second moments and step count carry over from task to
task (``algo.carry_state=true``): training tasks then run one after another, each from the
state the previous one left, and every evaluation task starts from that state and leaves
it as it was (the reference saves and restores it around each evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli.algorithms.adaptive import Adaptive, AdaptiveConfig
from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.engine.inner import last
from metacli.models.base import Model
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution


@dataclass
class ReptileConfig(AdaptiveConfig):
    name: str = "reptile"
    inner_lr: float = 0.02  # the plain SGD rate of the authors' sine-wave demo (reptile_sinusoid)
    inner_steps: int = 5
    # true: the update rule's state (Adam's moments and step count) carries over from
    # training task to training task, as the reference code's single TF optimizer does
    carry_state: bool = False


class Reptile(Adaptive, key="reptile"):
    Config: ClassVar[type[AlgoConfig]] = ReptileConfig
    cfg: ReptileConfig
    trains_rule = False  # theta - phi reaches the initialisation only
    keeps_graphs = False  # a task's phi is computed to the end and detached

    def __init__(self, cfg: ReptileConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        # The carried state lives in buffers, so checkpoints and resumes keep it.
        self.carried = nn.Module()
        if cfg.carry_state:
            fresh = self.rule.init(
                self.adapted(self.initial_params()), cfg.inner_lr, TaskRandom(None)
            )
            for name, tensor in self.rule.export_state(fresh).items():
                self.carried.register_buffer(name, tensor.detach().clone())

    @property
    def exact_gradient(self) -> bool:
        return False  # theta - mean(phi) is not the gradient of a loss of theta

    def start_state(self, lr: float) -> Any:
        if not self.cfg.carry_state:
            return None
        return self.rule.import_state(dict(self.carried.named_buffers()), lr)

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        if self.cfg.carry_state:
            return self.carried_loss(batch)
        return reptile_loss(self, batch)

    def carried_loss(self, batch: TaskBatch) -> MetaLoss:
        """The tasks one after another, each starting from the state the last one left."""
        theta = self.initial_params()
        detached = {n: p.detach() for n, p in theta.items()}
        state = self.start_state(self.train_lr)
        phis, metrics = [], []
        keys = self.executor.stream_keys(batch.keys, batch.tensors())
        for i in range(len(batch)):
            sx, sy, qx, qy = batch[i : i + 1].tensors()
            rng = TaskRandom(None if keys is None else keys[i])
            phi, metric, state = reptile_phi(self, rng, detached, sx[0], sy[0], qx[0], qy[0], state)
            phis.append(phi)
            metrics.append(metric)
        with torch.no_grad():
            for name, tensor in self.rule.export_state(state).items():
                getattr(self.carried, name).copy_(tensor)
        mean_phi = {n: torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}
        return MetaLoss(surrogate(theta, mean_phi), torch.stack(metrics).detach())


def reptile_phi(
    algorithm: Adaptive,
    rng: TaskRandom,
    params: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
    state: Any = None,
) -> tuple[Params, Tensor, Any]:
    """phi of one task: the inner loop on all its examples, the query metric there, and
    the update rule's final state."""
    x, y = TaskBatch.joined(sx, qx), TaskBatch.joined(sy, qy)
    steps = algorithm.adapt(
        params,
        x,
        y,
        algorithm.train_steps,
        algorithm.train_lr,
        True,
        rng,
        batch=algorithm.train_batch,
        state=state,
    )
    phi = last(steps)
    prediction = algorithm.forward_with(phi.params, qx, phi.index)
    return phi.params, algorithm.task.metric(prediction, qy), phi.state


def surrogate(theta: Params, mean_phi: Params) -> Tensor:
    """0.5 * ||theta - mean(phi)||^2, whose gradient in theta is theta - mean(phi)."""
    loss = sum(0.5 * (theta[n] - mean_phi[n].detach()).pow(2).sum() for n in theta)
    return torch.as_tensor(loss)


def reptile_loss(algorithm: Adaptive, batch: TaskBatch) -> MetaLoss:
    """Reptile's surrogate for any adaptive algorithm (Reptile, and MetaNAS's Reptile
    meta-learner), its tasks computed by the executor, each from a fresh rule state."""
    theta = algorithm.initial_params()
    detached = {n: p.detach() for n, p in theta.items()}

    def task(
        rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Params, Tensor]:
        phi, metric, _ = reptile_phi(algorithm, rng, params, sx, sy, qx, qy)
        return phi, metric

    phi, metrics = algorithm.executor.map(task, batch.keys, (detached,), batch.tensors())
    mean_phi = {n: p.mean(0) for n, p in phi.items()}  # phi: {name: [B, *shape]}
    return MetaLoss(surrogate(theta, mean_phi), metrics.detach())
