"""Fully connected network (1-40-40-1 with ReLU on sinusoid, as in MAML)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from metacli.config import require
from metacli.models.base import Model, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"

    def __post_init__(self) -> None:
        require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            self.hidden,
            "every layer width must be >= 1",
        )
        require(
            self.activation in ACTIVATIONS,
            "model.activation",
            self.activation,
            f"choose one of {', '.join(ACTIVATIONS)}",
        )


class MLP(Model, key="mlp"):
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        widths = [math.prod(input_shape), *cfg.hidden]
        layers: list[nn.Module] = [nn.Flatten(start_dim=-len(input_shape))]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[cfg.activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], output_dim) if output_dim else None
        self.feature_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:  # [N, *input_shape] -> [N, output_dim]
        features = self.body(x)
        return self.head(features) if self.head is not None else features
