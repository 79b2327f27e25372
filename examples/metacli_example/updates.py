"""RMSProp in the inner loop: s <- rho s + (1 - rho) g^2, theta <- theta - lr g / (sqrt(s)
+ eps), step for step what ``torch.optim.RMSprop(lr, alpha=rho, eps)`` does, with s per
task (the rule's state, started at zero for every task).

An update rule with state: ``init`` makes one task's state, ``update`` takes one inner
step; both act on ONE task with tensor operations alone (they run under vmap too). Its
settings are keys of ``algo`` (``update=rmsprop algo.rms_decay=0.9``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.adam import safe_sqrt
from metacli.updates.base import UpdateConfig, UpdateRule


@dataclass
class RMSPropRuleConfig(UpdateConfig):
    rms_decay: float = 0.99  # rho (torch's alpha)
    rms_eps: float = 1e-8

    def __post_init__(self) -> None:
        require(0 <= self.rms_decay < 1, "algo.rms_decay", self.rms_decay, "it must be in [0, 1)")
        require(self.rms_eps > 0, "algo.rms_eps", self.rms_eps, "it must be > 0")


class RMSPropRule(UpdateRule):
    Config = RMSPropRuleConfig

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return lr, {name: torch.zeros_like(p) for name, p in params.items()}

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr, square = state
        rho, eps = self.cfg.rms_decay, self.cfg.rms_eps
        square = {n: rho * square[n] + (1 - rho) * g * g for n, g in grads.items()}
        # (sqrt's derivative at 0 taken as 0: a second-order meta-gradient stays finite)
        new = {n: p - lr * grads[n] / (safe_sqrt(square[n]) + eps) for n, p in params.items()}
        return new, (lr, square)
