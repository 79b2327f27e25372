"""SmoothedMAML: MAML whose query loss smooths the labels (Szegedy et al. 2016, Sec. 7):
the target puts 1 - eps on the true class and eps / N on each of the N classes.

A variant of a built-in algorithm: its ``Config`` adds one setting to MAML's, and
``query_loss``, the loss of ONE task's query predictions after its inner loop (metacli maps
it over the meta-batch, under vmap, a loop or threads), replaces MAML's. Everything else is
MAML's: the inner loop, its update rule, evaluation, checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.config import require
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class SmoothedMAMLConfig(MAMLConfig):
    name: str = "smoothed_maml"
    smoothing: float = 0.1  # eps: the weight spread over the classes

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.smoothing < 1, "algo.smoothing", self.smoothing, "it must be in [0, 1)")


class SmoothedMAML(MAML):
    Config: ClassVar[type[AlgoConfig]] = SmoothedMAMLConfig
    cfg: SmoothedMAMLConfig

    def __init__(self, cfg: SmoothedMAMLConfig, model: Model, task: TaskDistribution) -> None:
        if not task.is_classification:
            raise ConfigError(
                f"algo={cfg.name} smooths class labels, but task={task.cfg.name} is not "
                f"classification. Choose a classification task, or algo=maml."
            )
        super().__init__(cfg, model, task)

    def query_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction, target, label_smoothing=self.cfg.smoothing)
