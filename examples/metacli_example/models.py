"""ResidualMLP: the built-in MLP with a skip connection around each hidden layer whose
input and output widths agree (h <- h + f(W h + b)).

A subclass of a built-in model: its ``Config`` changes a default and its ``forward``
changes the network. metacli calls models functionally (``torch.func.functional_call``),
so ``forward`` is all it needs; the MLP's hand-written passes serve the plain MLP alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from metacli.models.mlp import MLP, MLPConfig


@dataclass
class ResidualMLPConfig(MLPConfig):
    name: str = "residual_mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40, 40])


class ResidualMLP(MLP):
    Config = ResidualMLPConfig

    def forward(self, x: Tensor) -> Tensor:  # [N, *input_shape] -> [N, output_dim]
        flatten, *layers = self.body
        h = flatten(x)
        for linear, activation in zip(layers[0::2], layers[1::2], strict=True):
            out = activation(linear(h))
            h = out + h if out.shape == h.shape else out
        return self.head(h) if self.head is not None else h
