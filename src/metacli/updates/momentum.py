"""Heavy-ball momentum in the inner loop: a rule with state (the velocity).

v <- momentum * v + grad;  theta <- theta - lr * v   (v starts at zero), step for step
what ``torch.optim.SGD(lr, momentum)`` does. ``metacli train update=momentum
algo.momentum=0.5`` selects it with its setting (``MomentumRuleConfig`` holds the
default). The velocity lives in the per-task state, so tasks never share it. In the
optimizer space the step sizes (per adapted tensor) and the momentum are meta-learned,
the momentum as sigmoid(logit) so that it stays in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateConfig, UpdateRule


@dataclass
class MomentumRuleConfig(UpdateConfig):
    momentum: float = 0.9

    def __post_init__(self) -> None:
        require(0 <= self.momentum < 1, "algo.momentum", self.momentum, "it must be in [0, 1)")


def logit(value: float | list[float]) -> nn.Parameter:
    """Learned coefficients in (0, 1), stored before their sigmoid (kept off 0 and 1)."""
    return nn.Parameter(torch.logit(torch.tensor(value, dtype=torch.get_default_dtype()), eps=1e-6))


class MomentumRule(UpdateRule, key="momentum"):
    Config = MomentumRuleConfig

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.momentum_logit: nn.Parameter | None = None  # learned in the optimizer space

    def learn_hyperparameters(self, lr: float) -> None:
        self.learn_step_sizes(lr)
        self.momentum_logit = logit(self.cfg.momentum)

    def coefficient(self) -> Any:
        """The momentum: the setting, or its learned value."""
        if self.momentum_logit is None:
            return self.cfg.momentum
        return torch.sigmoid(self.momentum_logit)

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return lr, {name: torch.zeros_like(p) for name, p in params.items()}

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr, velocity = state
        momentum = self.coefficient()
        velocity = {n: momentum * velocity[n] + g for n, g in grads.items()}
        new = {n: p - self.step_size(n, lr) * velocity[n] for n, p in params.items()}
        return new, (lr, velocity)

    def scalars(self) -> dict[str, float]:
        if self.momentum_logit is None:
            return {}
        return {**super().scalars(), "momentum": float(torch.sigmoid(self.momentum_logit.detach()))}
