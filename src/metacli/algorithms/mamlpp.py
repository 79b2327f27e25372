"""MAML++ (Antoniou et al. 2019, "How to train your MAML").

The tricks, each with a switch (all off = MAML):
- LSLR: learned per-layer, per-step inner learning rates, the update rule ``lslr``
  (``algo.update=lslr``, the default here; ``algo.update=sgd`` switches it off).
- ``multi_step_loss`` (MSL): the meta-loss is a weighted sum of the query losses after
  every inner step; the weights of the non-final steps decay linearly to 0.03/N over
  ``msl_iterations``, after which only the final step counts.
- ``first_order_iterations`` (DA, derivative-order annealing): first-order meta-gradients
  for the first N outer steps, second order after.
- ``per_step_bn`` (BNWB): the model's batch norm gets separate affine parameters for
  each inner step (``model.norm=per_step``): inner step k's support forward and the query
  after update k both use set k (0-based), as the reference's ``num_step``; the norm
  parameters stay out of the inner loop (``algo.adapt_norm=false``), as the reference's
  ``enable_inner_loop_optimizable_bn_params: false``.
- ``cosine_outer_lr`` (CA): cosine annealing of the outer learning rate
  (``optim.scheduler=cosine``; ``optim.epoch_iterations`` steps it per epoch as the code).
- ``adapt_norm=false``: batch-norm parameters stay out of the inner loop (``true``, with
  every trick above off, is MAML with the ``lslr`` or ``sgd`` rule).
BNWB and CA change the model and optimizer settings before building (``configure``);
the run's summary.json and checkpoints record the settings that ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.algorithms.maml import MAML, MAMLConfig, TaskLoss
from metacli.config import require
from metacli.errors import ConfigError
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch


@dataclass
class MAMLPPConfig(MAMLConfig):
    name: str = "mamlpp"
    inner_lr: float = (
        0.1  # the learned rates' start (the authors' Omniglot init_inner_loop_learning_rate)
    )
    inner_steps: int = 5
    test_inner_steps: int | None = 5  # the authors evaluate with the training's 5 steps
    update: str = "lslr"
    multi_step_loss: bool = True
    msl_iterations: int = 5000
    first_order_iterations: int = 0
    per_step_bn: bool = True
    cosine_outer_lr: bool = True
    adapt_norm: bool = False  # the reference keeps the per-step norm parameters out
    # true: learned rates (update=lslr) on a regression task, which check_task refuses
    on_regression: bool = False

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
    weights: list[float] | None = None  # this meta-batch's MSL weights (None: final step only)

    @classmethod
    def check_task(cls, cfg: AlgoConfig, task_cls: type) -> None:
        assert isinstance(cfg, MAMLPPConfig)
        classifies = getattr(task_cls, "is_classification", True)
        if cfg.update == "lslr" and not classifies and not cfg.on_regression:
            task = getattr(task_cls, "key", task_cls.__name__)
            raise ConfigError(
                f"algo=mamlpp learns its inner rates per layer and step (algo.update=lslr), "
                f"and on a regression task (task={task}) they grow until the sharpest "
                f"tasks diverge: on the sinusoid 2 of 3 seeds reached an infinite "
                f"meta-loss, from algo.inner_lr=0.1 and from 0.01 (docs/defaults.md). "
                f"MAML++ is the authors' recipe for Omniglot and mini-ImageNet. On a "
                f"regression task set algo.update=sgd algo.inner_lr=0.01 (a fixed rate; "
                f"MAML++'s other parts stay), choose algo=maml or algo=metasgd, or set "
                f"algo.on_regression=true to learn the rates anyway."
            )

    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        assert isinstance(cfg, MAMLPPConfig)
        notes = []
        if cfg.per_step_bn and getattr(model_cfg, "norm", "none") != "none":
            steps = max(cfg.inner_steps, cfg.test_inner_steps or 0, 1)
            model_cfg.norm, model_cfg.norm_steps = "per_step", steps
            notes.append(f"mamlpp: per-step batch norm (model.norm=per_step, {steps} steps)")
        if cfg.cosine_outer_lr and run_cfg.optim.scheduler != "cosine":
            run_cfg.optim.scheduler = "cosine"
            notes.append("mamlpp: cosine annealing of the outer learning rate (optim.scheduler)")
        return notes

    def query_step(self, index: int) -> int:
        """After update k the query sees the norm set of step k - 1, the one the support
        used for that update (the reference's ``num_step``): N sets for N steps."""
        return max(index - 1, 0) if self.cfg.per_step_bn else index

    def use_first_order(self) -> bool:
        return self.cfg.first_order or int(self.outer_steps) < self.cfg.first_order_iterations

    def task_loss(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> TaskLoss:
        if self.weights is None:
            return super().task_loss(rng, params, sx, sy, qx, qy)
        steps = self.train_steps_of(rng, params, sx, sy)
        total = torch.zeros(())
        for step in steps:
            weight = self.weights[step.index - 1] if step.index else 0.0
            if weight > 0:
                prediction = self.forward_with(
                    step.params, qx, self.query_step(step.index), once=True
                )
                total = total + weight * self.task.loss(prediction, qy)
        return total, self.task.metric(prediction, qy).detach(), {}

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        iteration = int(self.outer_steps)
        use_msl = self.cfg.multi_step_loss and iteration < self.cfg.msl_iterations
        self.weights = (
            msl_weights(self.train_steps, iteration, self.cfg.msl_iterations) if use_msl else None
        )
        return super().meta_loss(batch)
