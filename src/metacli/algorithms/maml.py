"""MAML (Finn et al. 2017): learn an initialisation that adapts in a few gradient steps.

A task's inner loop (``Adaptive.adapt``: the update rule ``algo.update``, plain SGD by
default) is written for ONE task with ``torch.func``; the executor maps it over the
meta-batch (vmap, loop or threads). The second-order meta-gradient comes from
backpropagating through the inner updates; ``first_order`` treats each inner gradient
as a constant. First-order MAML, ANIL, Meta-SGD and MAML++ are MAML with other settings
or small overrides, so they subclass it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metacli.algorithms.base import Adaptive, AdaptiveConfig, AlgoConfig, MetaLoss
from metacli.engine.inner import Step, last
from metacli.engine.random import TaskRandom
from metacli.tasks.base import TaskBatch
from metacli.updates.base import Params

TaskLoss = tuple[Tensor, Tensor, dict[str, Tensor]]  # loss, metric, named terms


@dataclass
class MAMLConfig(AdaptiveConfig):
    name: str = "maml"
    first_order: bool = False


class MAML(Adaptive, key="maml"):
    Config: ClassVar[type[AlgoConfig]] = MAMLConfig
    cfg: MAMLConfig

    def use_first_order(self) -> bool:
        return self.cfg.first_order

    @property
    def exact_gradient(self) -> bool:
        return not self.use_first_order() and self.rule.exact

    def train_steps_of(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor
    ) -> Iterator[Step]:
        """The training inner loop of one task (its steps, rate, batches and order)."""
        return self.adapt(
            params,
            sx,
            sy,
            self.train_steps,
            self.train_lr,
            self.use_first_order(),
            rng,
            batch=self.train_batch,
        )

    def task_loss(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> TaskLoss:
        """The query loss of one task after the inner loop on its support set."""
        adapted = last(self.train_steps_of(rng, params, sx, sy))
        prediction = self.forward_with(adapted.params, qx, self.query_step(adapted.index))
        terms = {k: v.detach() for k, v in self.rule.terms(adapted.state).items()}
        return self.task.loss(prediction, qy), self.task.metric(prediction, qy).detach(), terms

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        return self.mean_over_tasks(self.task_loss, batch, self.initial_params())
