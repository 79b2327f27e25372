"""Meta-SGD's rule (Li et al. 2017): a learned rate for every parameter element.

theta <- theta - alpha * grad with ``alpha`` shaped like ``theta``, initialised to
``algo.inner_lr`` (or, with ``algo.metasgd_init: [low, high]``, drawn from U[low, high] per
element, the paper's U[0.005, 0.1]) and meta-learned with the initialisation; the learned
rates apply at validation and meta-test too (``algo.test_inner_lr`` is not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateConfig, UpdateRule, slot


@dataclass
class MetaSGDRuleConfig(UpdateConfig):
    metasgd_init: list[float] | None = None  # [low, high]: U[low, high]; null: inner_lr

    def __post_init__(self) -> None:
        bounds = self.metasgd_init
        require(
            bounds is None or (len(bounds) == 2 and 0 <= bounds[0] <= bounds[1]),
            "algo.metasgd_init",
            bounds,
            "give [low, high] with 0 <= low <= high, or null",
        )


class MetaSGDRule(UpdateRule, key="metasgd"):
    Config = MetaSGDRuleConfig

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        bounds = getattr(cfg, "metasgd_init", None)

        def initial(p: Tensor) -> Tensor:  # the run's seeded generator draws the uniform
            if bounds is None:
                return torch.full_like(p.detach(), lr)
            return torch.empty_like(p.detach()).uniform_(float(bounds[0]), float(bounds[1]))

        self.learning_rates = nn.ParameterDict(
            {slot(n): nn.Parameter(initial(p)) for n, p in params.items()}
        )

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return None

    def step_sizes(self, lr: float) -> dict[str, float | Tensor] | None:
        return dict(self.rates())  # (learned: lr is not used)

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
