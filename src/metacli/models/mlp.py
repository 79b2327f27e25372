"""Fully connected network (1-40-40-1 with ReLU on sinusoid, as in MAML)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from metacli.config import require
from metacli.models.base import Model, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
INITS = ("torch", "glorot")


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    # torch: nn.Linear's default (Kaiming-uniform weights, uniform biases); glorot:
    # Glorot-uniform weights and zero biases, Keras' Dense default (Yin et al.'s notebook).
    init: str = "torch"

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
        require(self.init in INITS, "model.init", self.init, f"choose one of {', '.join(INITS)}")


class MLP(Model, key="mlp"):
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        widths = [math.prod(input_shape), *cfg.hidden]
        self.in_dim = widths[0]
        layers: list[nn.Module] = [nn.Flatten(start_dim=-len(input_shape))]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[cfg.activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], output_dim) if output_dim else None
        self.feature_dim = widths[-1]
        if cfg.init == "glorot":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def squared_path_norm(self, params: dict[str, Tensor]) -> Tensor:
        # Every weight and bias squared, no activation, on an all-ones input (Path-SGD):
        # each unit then holds the sum over the paths that reach it.
        units = next(iter(params.values())).new_ones(self.in_dim)
        for name, layer in self.named_modules():
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
                units = weight.pow(2) @ units + bias.pow(2)
        return units.sum()

    def forward(self, x: Tensor) -> Tensor:  # [N, *input_shape] -> [N, output_dim]
        features = self.body(x)
        return self.head(features) if self.head is not None else features
