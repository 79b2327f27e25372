"""First-order MAML (Finn et al. 2017, Sec. 5.2): inner gradients are constants.

The meta-gradient is the query-loss gradient at the adapted parameters, applied to the
initialisation: it drops the Hessian term of MAML, saving its memory and time.
"""

from __future__ import annotations

from dataclasses import dataclass

from metacli.algorithms.maml import MAML, GradientConfig
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class FOMAMLConfig(GradientConfig):
    name: str = "fomaml"


class FOMAML(MAML, key="fomaml"):
    Config = FOMAMLConfig

    def __init__(self, cfg: GradientConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.first_order = True
