"""Meta-SGD (Li et al. 2017): a meta-learned learning rate for every parameter element.

The inner update is ``theta - alpha * grad`` with ``alpha`` a tensor shaped like
``theta``, initialised to ``algo.inner_lr`` and trained by the outer optimizer with the
initialisation. The learned rates are used at validation and meta-test too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig, Params
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class MetaSGDConfig(MAMLConfig):
    name: str = "metasgd"


def slot(name: str) -> str:
    """Parameter names contain dots, which module attribute names may not."""
    return name.replace(".", "__")


class MetaSGD(MAML, key="metasgd"):
    Config: ClassVar[type[AlgoConfig]] = MetaSGDConfig

    def __init__(self, cfg: MetaSGDConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.learning_rates = nn.ParameterDict(
            {
                slot(n): nn.Parameter(torch.full_like(p, cfg.inner_lr))
                for n, p in model.named_parameters()
            }
        )

    def inner_update(self, params: Params, grads: Params, step: int, lr: float) -> Params:
        # ``lr`` (algo.inner_lr / test_inner_lr) only initialised the learned rates.
        return {n: p - self.learning_rates[slot(n)] * grads[n] for n, p in params.items()}

    def inner_learning_rates(self) -> dict[str, float]:
        rates = torch.cat([r.detach().flatten() for r in self.learning_rates.values()])
        return {
            "inner_lr_mean": rates.mean().item(),
            "inner_lr_min": rates.min().item(),
            "inner_lr_max": rates.max().item(),
        }
