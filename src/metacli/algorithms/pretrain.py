"""The multi-task pretraining baseline that meta-learning is contrasted with.

Meta-training fits one model to all examples of the training tasks jointly, with no
inner loop; at validation and meta-test the model is fine-tuned on each task's support
set with the same inner optimizer as MAML (``test_inner_steps`` steps of SGD with
``test_inner_lr``, else ``inner_lr``): the "pretrained" row of MAML's sinusoid results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, GradientConfig, Params
from metacli.tasks.base import TaskBatch


@dataclass
class PretrainConfig(GradientConfig):
    name: str = "pretrain"


class Pretrain(MAML, key="pretrain"):
    inner_loop = False  # training fits all examples jointly; only testing fine-tunes
    Config: ClassVar[type[AlgoConfig]] = PretrainConfig

    def joint_loss(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        x, y = TaskBatch.joined(support_x, query_x), TaskBatch.joined(support_y, query_y)
        prediction = self.forward_with(params, x)
        return self.task.loss(prediction, y), self.task.metric(prediction, y).detach()

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        return self.mean_loss(self.joint_loss, self.initial_params(), batch)

    def inner_learning_rates(self) -> dict[str, float]:
        return {"inner_lr": self.test_lr}
