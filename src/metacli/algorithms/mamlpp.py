"""MAML++ (Antoniou et al. 2019, "How to train your MAML").

The tricks, each with a switch (all off = MAML):
- ``learn_inner_lr`` (LSLR): a learned inner learning rate per layer (parameter tensor)
  and per inner step, initialised to ``inner_lr``.
- ``multi_step_loss`` (MSL): the meta-loss is a weighted sum of the query losses after
  every inner step; the weights of the non-final steps decay linearly to 0.03/N over
  ``msl_iterations``, after which only the final step counts.
- ``first_order_iterations`` (DA, derivative-order annealing): first-order meta-gradients
  for the first N outer steps, second order after.
- ``per_step_bn`` (BNWB): the model's batch norm gets separate affine parameters for
  each inner step (``model.norm=per_step``).
- ``cosine_outer_lr`` (CA): cosine annealing of the outer learning rate
  (``optim.scheduler=cosine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig, Params
from metacli.algorithms.metasgd import slot
from metacli.config import require
from metacli.models.base import Model
from metacli.tasks.base import TaskBatch, TaskDistribution


@dataclass
class MAMLPPConfig(MAMLConfig):
    name: str = "mamlpp"
    inner_steps: int = 5
    learn_inner_lr: bool = True
    multi_step_loss: bool = True
    msl_iterations: int = 5000
    first_order_iterations: int = 0
    per_step_bn: bool = True
    cosine_outer_lr: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.msl_iterations >= 1, "algo.msl_iterations", self.msl_iterations, "it must be >= 1"
        )
        require(
            self.first_order_iterations >= 0,
            "algo.first_order_iterations",
            self.first_order_iterations,
            "it must be >= 0",
        )


def msl_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """Per-step query-loss weights at ``iteration`` (Antoniou et al.'s schedule)."""
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decay = iteration / anneal_iterations / steps
    floor = 0.03 / steps
    weights = [max(1.0 / steps - decay, floor) for _ in range(steps - 1)]
    final = min(1.0 / steps + (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [*weights, final]


class MAMLPP(MAML, key="mamlpp"):
    Config: ClassVar[type[AlgoConfig]] = MAMLPPConfig
    cfg: MAMLPPConfig

    def __init__(self, cfg: MAMLPPConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.step_lrs = (
            nn.ParameterDict(
                {
                    slot(n): nn.Parameter(torch.full((cfg.inner_steps,), cfg.inner_lr))
                    for n, _ in model.named_parameters()
                }
            )
            if cfg.learn_inner_lr
            else None
        )
        self.weights: list[float] | None = None

    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        assert isinstance(cfg, MAMLPPConfig)
        notes = []
        if cfg.per_step_bn and getattr(model_cfg, "norm", "none") != "none":
            steps = max(cfg.inner_steps, cfg.test_inner_steps or 0) + 1
            model_cfg.norm, model_cfg.norm_steps = "per_step", steps
            notes.append(f"mamlpp: per-step batch norm (model.norm=per_step, {steps} steps)")
        if cfg.cosine_outer_lr and run_cfg.optim.scheduler != "cosine":
            run_cfg.optim.scheduler = "cosine"
            notes.append("mamlpp: cosine annealing of the outer learning rate")
        return notes

    def inner_update(self, params: Params, grads: Params, step: int, lr: float) -> Params:
        if self.step_lrs is None:
            return super().inner_update(params, grads, step, lr)
        index = min(step, self.cfg.inner_steps - 1)  # extra test steps reuse the last rate
        return {n: p - self.step_lrs[slot(n)][index] * grads[n] for n, p in params.items()}

    def use_first_order(self) -> bool:
        return self.first_order or int(self.outer_steps) < self.cfg.first_order_iterations

    def task_query_loss(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.weights is None:
            return super().task_query_loss(params, support_x, support_y, query_x, query_y)
        first_order, total = self.use_first_order(), torch.zeros(())
        for step, weight in enumerate(self.weights):
            params = self.inner_step(params, support_x, support_y, step, self.train_lr, first_order)
            if weight > 0:
                prediction = self.forward_with(params, query_x, step + 1)
                total = total + weight * self.task.loss(prediction, query_y)
        return total, self.task.metric(prediction, query_y).detach()

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        iteration = int(self.outer_steps)
        use_msl = self.cfg.multi_step_loss and iteration < self.cfg.msl_iterations
        self.weights = (
            msl_weights(self.train_steps, iteration, self.cfg.msl_iterations) if use_msl else None
        )
        return super().meta_loss(batch)

    def inner_learning_rates(self) -> dict[str, float]:
        if self.step_lrs is None:
            return super().inner_learning_rates()
        rates = torch.cat([r.detach() for r in self.step_lrs.values()])
        return {"inner_lr_mean": rates.mean().item()}
