"""Sinusoid regression of Finn et al. 2017: y = A sin(w x - phi) + noise, MSE loss.

Finn et al.: w = 1, no noise (the defaults). Meta-SGD (Li et al. 2017) also draws the
frequency, w ~ U[0.8, 1.2] (``task.frequency=[0.8,1.2]``); ``task.noise`` adds Gaussian
observation noise to y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.config import require, require_ranges
from metacli.tasks.base import StackedMSE, TaskBatch, TaskConfig, TaskDistribution


@dataclass
class SinusoidConfig(TaskConfig):
    name: str = "sinusoid"
    shots: int = 10
    queries: int = 10
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    frequency: list[float] = field(default_factory=lambda: [1.0, 1.0])
    noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.noise >= 0, "task.noise", self.noise, "it must be >= 0")
        require_ranges("task", self, "amplitude", "phase", "x_range", "frequency")


class Sinusoid(TaskDistribution, key="sinusoid"):
    """Every split draws from the same distribution; splits differ only in their seeds."""

    Config = SinusoidConfig
    cfg: SinusoidConfig
    input_shape = (1,)
    output_dim = 1
    metric_name = "mse"
    stacked_loss = StackedMSE()
    higher_is_better = False

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        cfg = self.cfg
        shots = self.shots(split)
        points = shots + self.queries(split)

        def uniform(shape: tuple[int, ...], low_high: list[float]) -> Tensor:
            low, high = low_high
            return low + (high - low) * torch.rand(shape, generator=generator)

        amplitude = uniform((num_tasks, 1, 1), cfg.amplitude)
        phase = uniform((num_tasks, 1, 1), cfg.phase)
        x = uniform((num_tasks, points, 1), cfg.x_range)  # [B, S+Q, 1]
        frequency = (
            uniform((num_tasks, 1, 1), cfg.frequency)
            if cfg.frequency[0] != cfg.frequency[1]
            else torch.full((num_tasks, 1, 1), cfg.frequency[0])
        )
        y = amplitude * torch.sin(frequency * x - phase)
        if cfg.noise > 0:
            y = y + cfg.noise * torch.randn(y.shape, generator=generator)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    def metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)
