"""Heavy-ball momentum in the inner loop: a rule with state (the velocity).

v <- momentum * v + grad;  theta <- theta - lr * v   (v starts at zero), step for step
what ``torch.optim.SGD(lr, momentum)`` does. ``metacli train update=momentum
algo.momentum=0.5`` selects it with its setting; ``conf/update/momentum.yaml`` holds the
default. The velocity lives in the per-task state, so tasks never share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metacli.config import require
from metacli.engine.random import TaskRandom
from metacli.updates.base import Params, UpdateConfig, UpdateRule


@dataclass
class MomentumConfig(UpdateConfig):
    momentum: float = 0.9

    def __post_init__(self) -> None:
        require(0 <= self.momentum < 1, "algo.momentum", self.momentum, "it must be in [0, 1)")


class Momentum(UpdateRule, key="momentum"):
    Config = MomentumConfig

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return lr, {name: torch.zeros_like(p) for name, p in params.items()}

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr, velocity = state
        velocity = {n: self.cfg.momentum * velocity[n] + g for n, g in grads.items()}
        return {n: p - lr * velocity[n] for n, p in params.items()}, (lr, velocity)
