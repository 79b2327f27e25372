"""MAML (Finn et al. 2017): learn an initialisation that adapts in a few gradient steps.

The inner loop is written for ONE task with ``torch.func`` (``functional_call`` and
``grad``), then mapped over the meta-batch by ``per_task`` (vmap, loop or threads). The second-order
meta-gradient comes from backpropagating through the inner updates; ``first_order``
treats each inner gradient as a constant. Variants (first-order MAML, and later ANIL,
Meta-SGD, MAML++) subclass this and override the small hooks below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metacli.algorithms.base import AlgoConfig, Evaluation, MetaAlgorithm
from metacli.config import require
from metacli.models.base import Model
from metacli.tasks.base import TaskBatch, TaskDistribution

Params = dict[str, Tensor]


@dataclass
class GradientConfig(AlgoConfig):
    inner_lr: float = 0.01
    inner_steps: int = 1
    test_inner_steps: int | None = None  # null = inner_steps
    test_inner_lr: float | None = None  # null = inner_lr

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "the learning rate must be > 0")
        require(self.inner_steps >= 1, "algo.inner_steps", self.inner_steps, "it must be >= 1")
        require(
            self.test_inner_steps is None or self.test_inner_steps >= 0,
            "algo.test_inner_steps",
            self.test_inner_steps,
            "it must be >= 0 or null",
        )
        require(
            self.test_inner_lr is None or self.test_inner_lr > 0,
            "algo.test_inner_lr",
            self.test_inner_lr,
            "the learning rate must be > 0 or null",
        )


@dataclass
class MAMLConfig(GradientConfig):
    name: str = "maml"
    first_order: bool = False


class MAML(MetaAlgorithm, key="maml"):
    Config: ClassVar[type[AlgoConfig]] = MAMLConfig
    cfg: GradientConfig

    def __init__(self, cfg: GradientConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.first_order = bool(getattr(cfg, "first_order", False))
        self.train_steps = cfg.inner_steps
        self.test_steps = cfg.inner_steps if cfg.test_inner_steps is None else cfg.test_inner_steps
        self.train_lr = cfg.inner_lr
        self.test_lr = cfg.inner_lr if cfg.test_inner_lr is None else cfg.test_inner_lr

    # --- hooks for variants -------------------------------------------------------------
    def initial_params(self) -> Params:
        """The meta-learned initialisation the inner loop starts from."""
        return dict(self.model.named_parameters())

    def adapted(self, params: Params) -> Params:
        """The part of ``params`` the inner loop updates (all of it; ANIL: the head)."""
        return params

    def inner_update(self, params: Params, grads: Params, step: int, lr: float) -> Params:
        """One inner step; plain gradient descent with step size ``lr``."""
        return {name: p - lr * grads[name] for name, p in params.items()}

    def use_first_order(self) -> bool:
        return self.first_order

    # --- one task ---------------------------------------------------------------------
    def forward_with(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        """The model with weights ``params`` on ``x``, as seen at inner step ``step``."""
        model = self.replica()
        model.set_step(step)
        buffers = dict(self.model.named_buffers())
        return torch.func.functional_call(model, (params, buffers), (x,))

    def support_loss(self, params: Params, x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        return self.task.loss(self.forward_with(params, x, step), y)

    def inner_step(
        self, params: Params, x: Tensor, y: Tensor, step: int, lr: float, first_order: bool
    ) -> Params:
        """One gradient step on one task's support set ``x`` [S, ...], ``y`` [S, ...]."""
        fast = self.adapted(params)

        def loss(fast: Params) -> Tensor:
            return self.support_loss({**params, **fast}, x, y, step)

        grads = self.gradient(loss, fast, first_order)
        return {**params, **self.inner_update(fast, grads, step, lr)}

    def gradient(self, loss: Callable[[Params], Tensor], fast: Params, first_order: bool) -> Params:
        """d loss / d fast; differentiable unless ``first_order``.

        Under vmap this must be ``torch.func.grad``; in the per-task loop plain autograd is
        faster (measured: docs/benchmarks.md), with identical numbers.
        """
        if self.batching == "vmap":
            grads = torch.func.grad(loss)(fast)
            return {n: g.detach() for n, g in grads.items()} if first_order else grads
        with torch.enable_grad():  # evaluation runs under no_grad with detached weights
            leaves = {
                n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()
            }
            grads = torch.autograd.grad(
                loss(leaves),
                list(leaves.values()),
                create_graph=not first_order,
                materialize_grads=True,
            )
        return dict(zip(leaves, grads, strict=True))

    def adapt(
        self, params: Params, x: Tensor, y: Tensor, steps: int, lr: float, first_order: bool
    ) -> Params:
        for step in range(steps):
            params = self.inner_step(params, x, y, step, lr, first_order)
        return params

    def task_query_loss(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        adapted = self.adapt(
            params, support_x, support_y, self.train_steps, self.train_lr, self.use_first_order()
        )
        prediction = self.forward_with(adapted, query_x, self.train_steps)
        return self.task.loss(prediction, query_y), self.task.metric(prediction, query_y).detach()

    def task_trace(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Query loss and metric after 0..k inner steps of one task: two [k+1] tensors."""
        losses, metrics = [], []
        for step in range(self.test_steps + 1):
            prediction = self.forward_with(params, query_x, step)
            losses.append(self.task.loss(prediction, query_y))
            metrics.append(self.task.metric(prediction, query_y))
            if step < self.test_steps:
                params = self.inner_step(params, support_x, support_y, step, self.test_lr, True)
        return torch.stack(losses), torch.stack(metrics)

    # --- the meta-batch -----------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        return self.mean_loss(self.task_query_loss, self.initial_params(), batch)  # [], [B]

    def evaluate(self, batch: TaskBatch) -> Evaluation:
        params = {name: p.detach() for name, p in self.initial_params().items()}
        with torch.no_grad():
            losses, metrics = self.map_tasks(self.task_trace, params, batch)
        return Evaluation(loss=losses, metric=metrics)  # [B, k+1] each

    def inner_learning_rates(self) -> dict[str, float]:
        return {"inner_lr": self.train_lr}
