"""Fully connected network (1-40-40-1 with ReLU on sinusoid, as in MAML)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.config import require
from metacli.models.base import Model, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "tanh": torch.tanh}
INITS = ("torch", "glorot", "truncated_normal")


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    # torch: nn.Linear's default (Kaiming-uniform weights, uniform biases); glorot:
    # Glorot-uniform weights and zero biases, Keras' Dense default (Yin et al.'s notebook);
    # truncated_normal: weights N(0, init_std^2) cut at 2 std, zero biases (cbfinn/maml's
    # construct_fc_weights, std 0.01).
    init: str = "torch"
    init_std: float = 0.01

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
        require(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")


class MLP(Model, key="mlp"):
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        self.input_shape = tuple(input_shape)
        widths = [math.prod(input_shape), *cfg.hidden]
        self.in_dim = widths[0]
        layers: list[nn.Module] = [nn.Flatten(start_dim=-len(input_shape))]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[cfg.activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], output_dim) if output_dim else None
        self.feature_dim = widths[-1]
        for layer in self.modules():
            if isinstance(layer, nn.Linear) and cfg.init != "torch":
                if cfg.init == "glorot":
                    nn.init.xavier_uniform_(layer.weight)
                else:
                    std = cfg.init_std
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(layer.bias)

    def functional(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
    ) -> Tensor:
        """The forward pass written out (1.2x faster sinusoid MAML than functional_call)."""
        layers = self.__dict__.get("_layers")
        if layers is None:  # (weight, bias) names in order; the structure is fixed once built
            names = [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]
            layers = self.__dict__["_layers"] = [(f"{n}.weight", f"{n}.bias") for n in names]
        act = FUNCTIONS[self.cfg.activation]  # type: ignore[attr-defined]
        h = x.flatten(start_dim=x.dim() - len(self.input_shape))
        for i, (weight, bias) in enumerate(layers):
            h = F.linear(h, params[weight], params[bias])
            if i < len(self.body) // 2:  # the body's layers are followed by the activation
                h = act(h)
        return h

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
