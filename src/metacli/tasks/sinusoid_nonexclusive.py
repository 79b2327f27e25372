"""The non-mutually-exclusive sinusoid of Yin et al. 2020 ("Meta-learning without memorization").

Faithful to the authors' notebook (google-research, meta_learning_without_memorization/
sinusoid/MR_MAML.ipynb):

- training tasks: y = A sin(x - phase) with phase 0, A one of the first 16 of 20 fixed
  amplitudes linspace(0.1, 4.0) (the notebook draws ``randint(0, K_amp - 5)``, inclusive),
  the amplitude's 20-d one-hot appended to x (inputs 21 wide), x ~ U[-5, 5], Gaussian
  noise of std 0.1 on y; 10 support and 10 query points;
- validation and test tasks: A ~ U[0.1, 4.0] with a random one-hot among the trained
  indices, which says nothing about A (memorising the index misleads); 5 support points
  x ~ U[-5, 5] whose y gets the noise twice, as the notebook's ``eval_sinewave_for_test``
  adds it once more to an already noisy batch; 200 query points on the grid
  linspace(-4.5, 4.5) with noise 0.1.

``task.test_tasks=notebook`` meta-tests on the notebook's own test tasks (task i drawn by
numpy's legacy generator seeded with i, the same in every run) instead of the run's.

The training set is fixed by the one-hot: a learner can read the amplitude from the
input and ignore the support set, and then fails on the test tasks. That is the
memorisation problem meta-regularisation addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.config import require, require_ranges
from metacli.tasks.base import StackedMSE, TaskBatch, TaskConfig, TaskDistribution


@dataclass
class NonExclusiveSinusoidConfig(TaskConfig):
    name: str = "sinusoid_nonexclusive"
    shots: int = 10
    queries: int = 10
    test_shots: int | None = 5  # the notebook's n_context at meta-test
    test_queries: int = 200  # validation and test: a grid over test_grid
    amplitudes: int = 20  # the fixed amplitudes linspace(amplitude[0], amplitude[1], amplitudes)
    train_amplitudes: int = 16  # training draws the first 16 of them
    amplitude: list[float] = field(default_factory=lambda: [0.1, 4.0])
    phase: float = 0.0
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    test_grid: list[float] = field(default_factory=lambda: [-4.5, 4.5])
    noise: float = 0.1
    test_support_noise_draws: int = 2  # the notebook's test support y is noised twice
    # sampled: test tasks from the run's seed; notebook: the notebook's own test tasks
    # (task i from numpy's legacy generator seeded with i, the same in every run)
    test_tasks: str = "sampled"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.amplitudes >= 1, "task.amplitudes", self.amplitudes, "it must be >= 1")
        require(
            1 <= self.train_amplitudes <= self.amplitudes,
            "task.train_amplitudes",
            self.train_amplitudes,
            f"it must be in [1, task.amplitudes={self.amplitudes}]",
        )
        require(self.test_queries >= 1, "task.test_queries", self.test_queries, "it must be >= 1")
        require(self.noise >= 0, "task.noise", self.noise, "it must be >= 0")
        require(
            self.test_support_noise_draws >= 0,
            "task.test_support_noise_draws",
            self.test_support_noise_draws,
            "it must be >= 0",
        )
        require_ranges("task", self, "amplitude", "x_range", "test_grid")
        require(
            self.test_tasks in ("sampled", "notebook"),
            "task.test_tasks",
            self.test_tasks,
            "sampled or notebook",
        )


class NonExclusiveSinusoid(TaskDistribution, key="sinusoid_nonexclusive"):
    Config = NonExclusiveSinusoidConfig
    cfg: NonExclusiveSinusoidConfig
    output_dim = 1
    metric_name = "mse"
    stacked_loss = StackedMSE()
    higher_is_better = False

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, NonExclusiveSinusoidConfig)
        return (1 + cfg.amplitudes,)

    def __init__(
        self,
        cfg: NonExclusiveSinusoidConfig,
        data_root: str | None = None,
        cache_folder: str | None = None,
    ) -> None:
        super().__init__(cfg, data_root)
        low, high = cfg.amplitude
        self.amplitude_values = torch.linspace(low, high, cfg.amplitudes)

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        cfg, shots = self.cfg, self.shots(split)
        index = torch.randint(cfg.train_amplitudes, (num_tasks,), generator=generator)
        low, high = cfg.x_range
        if split == "train":
            points = shots + self.queries(split)
            amplitude = self.amplitude_values[index].view(-1, 1, 1)
            x = low + (high - low) * torch.rand(num_tasks, points, 1, generator=generator)
            y = amplitude * torch.sin(x - cfg.phase)
            y = y + cfg.noise * torch.randn(y.shape, generator=generator)
            sx, sy, qx, qy = x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]
        elif split == "test" and cfg.test_tasks == "notebook":
            sx, sy, qx, qy = self.notebook_tasks(num_tasks, shots)
        else:  # a continuous amplitude; the one-hot is a trained index, uninformative
            a_low, a_high = cfg.amplitude
            amplitude = a_low + (a_high - a_low) * torch.rand(num_tasks, 1, 1, generator=generator)
            sx = low + (high - low) * torch.rand(num_tasks, shots, 1, generator=generator)
            sy = amplitude * torch.sin(sx - cfg.phase)
            for _ in range(cfg.test_support_noise_draws):
                sy = sy + cfg.noise * torch.randn(sy.shape, generator=generator)
            grid = torch.linspace(cfg.test_grid[0], cfg.test_grid[1], cfg.test_queries)
            qx = grid.view(1, -1, 1).expand(num_tasks, -1, -1).clone()
            qy = amplitude * torch.sin(qx - cfg.phase)
            qy = qy + cfg.noise * torch.randn(qy.shape, generator=generator)
        one_hot = F.one_hot(index, cfg.amplitudes).to(sx.dtype).unsqueeze(1)  # [B, 1, 20]
        return TaskBatch(
            torch.cat([sx, one_hot.expand(-1, sx.shape[1], -1)], dim=-1),
            sy,
            torch.cat([qx, one_hot.expand(-1, qx.shape[1], -1)], dim=-1),
            qy,
        )

    def notebook_tasks(self, num_tasks: int, shots: int) -> tuple[Tensor, ...]:
        """Test tasks 0..num_tasks-1 exactly as the notebook draws them: for task i,
        ``np.random.seed(i)``, A = uniform(A_low, A_high); the generator is seeded with i
        again for x = uniform(-5, 5, K), then the support noise (twice), 200 discarded
        draws (the noise-free grid's ``normal(scale=0)``) and the grid's noise. Its one-hot
        index comes from Python's unseeded ``random`` there; here from the split's stream."""
        cfg = self.cfg
        low, high = cfg.x_range
        grid = np.linspace(cfg.test_grid[0], cfg.test_grid[1], cfg.test_queries)
        tasks = []
        for i in range(num_tasks):
            amplitude = np.random.RandomState(i).uniform(cfg.amplitude[0], cfg.amplitude[1])
            draws = np.random.RandomState(i)
            x = draws.uniform(low, high, shots)
            y = amplitude * np.sin(x - cfg.phase)
            for _ in range(cfg.test_support_noise_draws):
                y = y + draws.normal(scale=cfg.noise, size=shots)
            draws.normal(scale=0.0, size=len(grid))
            target = amplitude * np.sin(grid - cfg.phase) + draws.normal(
                scale=cfg.noise, size=len(grid)
            )
            tasks.append((x, y, grid, target))
        dtype = torch.get_default_dtype()
        return tuple(
            torch.tensor(np.stack([t[k] for t in tasks]), dtype=dtype).unsqueeze(-1)
            for k in range(4)
        )

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    def metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)
