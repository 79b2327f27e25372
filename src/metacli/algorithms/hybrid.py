"""The hybrid meta-objective: multi-task training plus lambda times the MAML loss.

L = task_weight * L_task + lam * L_MAML per task, where L_task is the loss of the
un-adapted meta-parameters on all of the task's examples (support and query: what
``pretrain`` fits) and L_MAML the query loss after the inner loop (what ``maml`` fits).
``lam=0`` gives exactly the pretraining gradient and ``task_weight=0`` (or ``lam=inf``,
the limit rescaled by 1/lam) exactly MAML's;
in between it blends learning a good model with learning a good initialisation. Both
terms are logged (``task_loss``, ``maml_loss`` in metrics.jsonl).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig, TaskLoss
from metacli.config import INF_ALLOWED, require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch


@dataclass
class HybridConfig(MAMLConfig):
    name: str = "hybrid"
    # weight of the MAML (post-adaptation query) loss; inf: MAML's alone
    lam: float = field(default=1.0, metadata=INF_ALLOWED)
    task_weight: float = 1.0  # weight of the multi-task loss of the un-adapted parameters

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lam >= 0, "algo.lam", self.lam, "it must be >= 0")
        require(self.task_weight >= 0, "algo.task_weight", self.task_weight, "it must be >= 0")


class Hybrid(MAML, key="hybrid"):
    Config: ClassVar[type[AlgoConfig]] = HybridConfig
    cfg: HybridConfig

    def task_loss(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> TaskLoss:
        maml_loss, metric, _ = super().task_loss(rng, params, sx, sy, qx, qy)
        x, y = TaskBatch.joined(sx, qx), TaskBatch.joined(sy, qy)
        task_loss = self.task.loss(self.forward_with(params, x, once=True), y)
        if math.isinf(self.cfg.lam):  # the limit of L / lam
            total = maml_loss
        else:
            total = self.cfg.task_weight * task_loss + self.cfg.lam * maml_loss
        return total, metric, {"task_loss": task_loss.detach(), "maml_loss": maml_loss.detach()}
