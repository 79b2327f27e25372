"""Plain gradient descent, MAML's inner step: theta <- theta - lr * grad.

In the optimizer space (``algo.update=space``) its step size is learned per adapted tensor
(``UpdateRule.learn_hyperparameters``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from metacli.params import Params
from metacli.updates.base import UpdateRule


class SGDRule(UpdateRule, key="sgd"):
    def learn_hyperparameters(self, lr: float) -> None:
        self.learn_step_sizes(lr)

    def step_sizes(self, lr: float) -> dict[str, float | Tensor] | None:
        return {n: self.step_size(n, lr) for n in self.names}

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr = state  # the phase's step size, fixed by ``init``
        return {n: p - self.step_size(n, lr) * grads[n] for n, p in params.items()}, state
