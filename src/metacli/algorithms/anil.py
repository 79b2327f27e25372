"""ANIL (Raghu et al. 2020): Almost No Inner Loop.

Only the linear head is adapted in the inner loop; the body (feature extractor) is
meta-learned in the outer loop alone. The meta-gradient still flows to the body through
the adapted head (second order unless ``first_order``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig, Params
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class ANILConfig(MAMLConfig):
    name: str = "anil"


class ANIL(MAML, key="anil"):
    Config: ClassVar[type[AlgoConfig]] = ANILConfig

    def __init__(self, cfg: ANILConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.head_names = [n for n, _ in model.named_parameters() if n.startswith("head.")]
        if not self.head_names:
            raise ConfigError(
                f"algo=anil adapts the model's linear head, but model="
                f"{model.cfg.name} has none. Use a model with a head."
            )

    def adapted(self, params: Params) -> Params:
        return {name: params[name] for name in self.head_names}
