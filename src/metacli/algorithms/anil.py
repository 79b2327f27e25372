"""ANIL (Raghu et al. 2020): Almost No Inner Loop.

Only the linear head is adapted in the inner loop; the body (feature extractor) is
meta-learned in the outer loop alone. The meta-gradient still flows to the body through
the adapted head (second order unless ``first_order``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class ANILConfig(MAMLConfig):
    name: str = "anil"


class ANIL(MAML, key="anil"):
    Config: ClassVar[type[AlgoConfig]] = ANILConfig

    def __init__(self, cfg: ANILConfig, model: Model, task: TaskDistribution) -> None:
        if not any(n.startswith("head.") for n, _ in model.named_parameters()):
            raise ConfigError(
                f"algo=anil adapts the model's linear head, but model="
                f"{model.cfg.name} has none. Use a model with a head."
            )
        super().__init__(cfg, model, task)

    def adapted_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith("head.")]
