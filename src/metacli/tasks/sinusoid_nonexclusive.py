"""The non-mutually-exclusive sinusoid of Yin et al. 2020 ("Meta-learning without memorization").

Amplitudes come from a fixed set of 20 (linspace(0.1, 4)); the task's one-hot amplitude
index is appended to every input x, and y gets Gaussian noise (0.1). A learner can then
memorise the amplitude from the input and ignore the support set: the memorisation
problem that meta-regularisation addresses. Phases are drawn as in Finn et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.config import require
from metacli.tasks.base import TaskBatch, TaskConfig, TaskDistribution


@dataclass
class NonExclusiveSinusoidConfig(TaskConfig):
    name: str = "sinusoid_nonexclusive"
    shots: int = 10
    queries: int = 10
    amplitudes: int = 20  # fixed amplitudes linspace(low, high, amplitudes)
    amplitude: list[float] = field(default_factory=lambda: [0.1, 4.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    noise: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.amplitudes >= 1, "task.amplitudes", self.amplitudes, "it must be >= 1")
        require(self.noise >= 0, "task.noise", self.noise, "it must be >= 0")


class NonExclusiveSinusoid(TaskDistribution, key="sinusoid_nonexclusive"):
    Config = NonExclusiveSinusoidConfig
    cfg: NonExclusiveSinusoidConfig
    output_dim = 1
    metric_name = "mse"
    higher_is_better = False

    def __init__(
        self,
        cfg: NonExclusiveSinusoidConfig,
        data_root: str | None = None,
        cache_folder: str | None = None,
    ) -> None:
        super().__init__(cfg, data_root)
        self.input_shape = (1 + cfg.amplitudes,)
        low, high = cfg.amplitude
        self.amplitude_values = torch.linspace(low, high, cfg.amplitudes)

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        cfg, shots = self.cfg, self.shots(split)
        points = shots + cfg.queries
        index = torch.randint(cfg.amplitudes, (num_tasks,), generator=generator)
        low, high = cfg.phase
        phase = low + (high - low) * torch.rand(num_tasks, 1, 1, generator=generator)
        low, high = cfg.x_range
        x = low + (high - low) * torch.rand(num_tasks, points, 1, generator=generator)
        y = self.amplitude_values[index].view(-1, 1, 1) * torch.sin(x - phase)
        y = y + cfg.noise * torch.randn(y.shape, generator=generator)
        one_hot = F.one_hot(index, cfg.amplitudes).to(x.dtype)  # [B, amplitudes]
        inputs = torch.cat([x, one_hot.unsqueeze(1).expand(-1, points, -1)], dim=-1)
        return TaskBatch(inputs[:, :shots], y[:, :shots], inputs[:, shots:], y[:, shots:])

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    def metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)
