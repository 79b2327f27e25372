"""MAML (Finn et al. 2017): learn an initialisation that adapts in a few gradient steps.

A task's inner loop (``Adaptive.adapt``: the update rule ``algo.update``, plain SGD by
default) is written for ONE task with ``torch.func``; the executor maps it over the
meta-batch (vmap, loop or threads). The second-order meta-gradient comes from
backpropagating through the inner updates; ``first_order`` treats each inner gradient
as a constant. First-order MAML, ANIL, Meta-SGD and MAML++ are MAML with other settings
or small overrides, so they subclass it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from metacli.algorithms.adaptive import Adaptive, AdaptiveConfig
from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.engine.executor import carrying
from metacli.engine.inner import Step, last
from metacli.engine.stacked_meta_gradient import meta_gradient
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch

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
        step = self.query_step(adapted.index)
        prediction = self.forward_with(adapted.params, qx, step, once=True)
        terms = {k: v.detach() for k, v in self.rule.terms(adapted.state).items()}
        return self.query_loss(prediction, qy), self.task.metric(prediction, qy).detach(), terms

    def query_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The loss of one task's query predictions after adaptation: the task's (a variant
        of MAML may change it, and nothing else)."""
        return self.task.loss(prediction, target)

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        stacked = self.stacked_meta_loss(batch) if torch.is_grad_enabled() else None
        if stacked is not None:
            return stacked
        return self.mean_over_tasks(self.task_loss, batch, self.initial_params())

    def stacks(self) -> bool:
        """The stacked path (``metacli.engine.stacked_meta_gradient``) serves a support
        loss that is the model's and the task's, both written out, a rule that is plain
        gradient descent, no mini-batches, and nothing of the step a subclass's own.
        Decided once."""
        decided = self.__dict__.get("_stacks")
        if decided is None:
            kind = type(self)
            decided = self.__dict__["_stacks"] = (
                self.cfg.batching in ("auto", "stacked")
                and self.plain_support_loss
                and kind.task_loss is MAML.task_loss
                and kind.query_loss is MAML.query_loss
                and kind.train_steps_of is MAML.train_steps_of
                and kind.query_step is Adaptive.query_step
                and self.cfg.inner_batch is None
                and self.model.has_stacked_pass()
                and not self.model.tracks_running_stats
                and self.task.stacked_loss is not None
                and self.rule.step_sizes(self.train_lr) is not None
            )
        return decided

    def stacked_meta_loss(self, batch: TaskBatch) -> MetaLoss | None:
        """The meta-loss whose gradient is the meta-gradient written out (through
        ``torch.compile`` with ``algo.compile=true``); None where training does not stack."""
        if not self.stacks():
            return None
        rates = self.rule.step_sizes(self.train_lr)
        assert rates is not None and self.task.stacked_loss is not None
        sx, sy, qx, qy = batch.tensors()
        params = self.initial_params()
        scale = self.inner_scale(sx.shape[1], self.task.output_dim)
        args: tuple[Any, ...] = (self.model.stacked_pass, self.task.stacked_loss, params, rates)
        args += (self.train_steps, self.use_first_order(), scale, (sx, sy), (qx, qy))
        compute = meta_gradient
        if self.executor.compiling:
            compute = functools.partial(self.executor.compiled_call, meta_gradient, meta_gradient)
        written = compute(*args)
        if written is None:  # (the model or the loss declined these shapes)
            return None
        pairs = [(params[n], g) for n, g in written.grads.items() if params[n].requires_grad]
        pairs += [(cast(Tensor, rates[n]), g) for n, g in written.rate_grads.items()]  # learned
        leaves, grads = [p for p, _ in pairs], [g for _, g in pairs]
        return MetaLoss(carrying(written.losses.mean(), leaves, grads), written.metrics)
