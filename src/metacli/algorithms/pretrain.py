"""The multi-task pretraining baseline that meta-learning is contrasted with.

Meta-training fits one model to all examples of the training tasks jointly, with no
inner loop; at validation and meta-test the model is fine-tuned on each task's support
set with the inner loop of every adaptive algorithm (``test_inner_steps`` steps of the
update rule with ``test_inner_lr``, else ``inner_lr``): the "pretrained" row of MAML's
sinusoid results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metacli.algorithms.adaptive import Adaptive, AdaptiveConfig
from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch


@dataclass
class PretrainConfig(AdaptiveConfig):
    name: str = "pretrain"


class Pretrain(Adaptive, key="pretrain"):
    inner_loop = False  # training fits all examples jointly; only testing fine-tunes
    trains_rule = False
    Config: ClassVar[type[AlgoConfig]] = PretrainConfig

    def joint_loss(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x, y = TaskBatch.joined(sx, qx), TaskBatch.joined(sy, qy)
        prediction = self.forward_with(params, x, once=True)
        return self.task.loss(prediction, y), self.task.metric(prediction, y).detach(), {}

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        return self.mean_over_tasks(self.joint_loss, batch, self.initial_params())

    def scalars(self) -> dict[str, float]:
        return {"inner_lr": self.test_lr}  # the fine-tuning step size
