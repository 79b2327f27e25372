"""Plain gradient descent, MAML's inner step: theta <- theta - lr * grad."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from metacli.updates.base import Params, UpdateRule


class SGD(UpdateRule, key="sgd"):
    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr = state  # the phase's step size, fixed by ``init``
        return {name: p - lr * grads[name] for name, p in params.items()}, state
