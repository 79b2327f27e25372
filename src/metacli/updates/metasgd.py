"""Meta-SGD's rule (Li et al. 2017): a learned rate for every parameter element.

theta <- theta - alpha * grad with ``alpha`` shaped like ``theta``, initialised to
``algo.inner_lr`` and meta-learned with the initialisation; the learned rates apply at
validation and meta-test too (``algo.test_inner_lr`` is not used).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metacli.engine.random import TaskRandom
from metacli.updates.base import Params, UpdateRule, slot


class MetaSGD(UpdateRule, key="metasgd"):
    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.learning_rates = nn.ParameterDict(
            {slot(n): nn.Parameter(torch.full_like(p.detach(), lr)) for n, p in params.items()}
        )

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return None

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        return {n: p - self.learning_rates[slot(n)] * grads[n] for n, p in params.items()}, state

    def rates(self) -> dict[str, Tensor]:
        return {n: self.learning_rates[slot(n)] for n in self.names}

    def scalars(self) -> dict[str, float]:
        rates = torch.cat([r.detach().flatten() for r in self.learning_rates.values()])
        return {
            "inner_lr_mean": rates.mean().item(),
            "inner_lr_min": rates.min().item(),
            "inner_lr_max": rates.max().item(),
        }
