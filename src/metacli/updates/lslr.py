"""Learned per-layer, per-step inner rates (LSLR, MAML++; Antoniou et al. 2019).

One learned rate for each parameter tensor and each training inner step, initialised to
``algo.inner_lr``; evaluation steps beyond ``algo.inner_steps`` reuse the last step's
rates, as in the reference code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateRule, slot


class LSLRRule(UpdateRule, key="lslr"):
    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.steps = steps
        self.learning_rates = nn.ParameterDict(
            {slot(n): nn.Parameter(torch.full((steps,), lr)) for n in params}
        )

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return None

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        index = min(step, self.steps - 1)
        new = {n: p - self.learning_rates[slot(n)][index] * grads[n] for n, p in params.items()}
        return new, state

    def rates(self) -> dict[str, Tensor]:
        return {n: self.learning_rates[slot(n)] for n in self.names}

    def scalars(self) -> dict[str, float]:
        rates = torch.stack([r.detach() for r in self.learning_rates.values()])  # [tensors, steps]
        per_step = {f"inner_lr_step{j}": v.item() for j, v in enumerate(rates.mean(0))}
        return {"inner_lr_mean": rates.mean().item(), **per_step}
