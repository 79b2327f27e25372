"""Adam (Kingma & Ba 2015) as an inner-loop update rule, per task, with its moments as state.

At inner step t = 1, 2, ... (gradient g of the support loss):

    m <- beta1 m + (1 - beta1) g        v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

computed step for step as ``torch.optim.Adam`` computes it (moments from zero, its order of
operations). The step size is ``algo.adam_lr``, or the phase's inner learning rate when that
is null: Adam's steps are about ``lr`` per coordinate whatever the gradient's scale, so the
SGD-sized rates of ``algo.inner_lr`` rarely suit it. Differentiable, second order included:
sqrt is taken so that its derivative at v = 0 (a coordinate whose gradients were all zero)
is zero instead of inf * 0 = NaN. In the optimizer space the step sizes (per adapted
tensor) and both betas (through a sigmoid) are meta-learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateConfig, UpdateRule, slot
from metacli.updates.momentum import logit


@dataclass
class AdamRuleConfig(UpdateConfig):
    adam_lr: float | None = None  # null: the phase's inner learning rate
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        require(
            self.adam_lr is None or self.adam_lr > 0,
            "algo.adam_lr",
            self.adam_lr,
            "it must be > 0 or null",
        )
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "algo.adam_betas",
            self.adam_betas,
            "give [beta1, beta2], each in [0, 1)",
        )
        require(self.adam_eps > 0, "algo.adam_eps", self.adam_eps, "it must be > 0")


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0 whose derivative at 0 is 0, not inf (which times 0 is NaN)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


class AdamRule(UpdateRule, key="adam"):
    Config = AdamRuleConfig

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.beta_logits: nn.Parameter | None = None  # learned in the optimizer space

    def learn_hyperparameters(self, lr: float) -> None:
        self.learn_step_sizes(self.cfg.adam_lr or lr)
        self.beta_logits = logit([float(b) for b in self.cfg.adam_betas])

    def betas(self) -> tuple[Any, Any]:
        if self.beta_logits is None:
            return self.cfg.adam_betas[0], self.cfg.adam_betas[1]
        beta1, beta2 = torch.sigmoid(self.beta_logits).unbind()
        return beta1, beta2

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        lr = self.cfg.adam_lr or lr
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        return lr, zeros, dict(zeros), 0  # the step size, m, v and the steps taken

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr, m, v, taken = state
        beta1, beta2 = self.betas()
        t = taken + 1  # counted in the state, so that a carried state continues its count
        correction1, correction2 = 1 - beta1**t, (1 - beta2**t) ** 0.5
        m = {n: torch.lerp(m[n], g, 1 - beta1) for n, g in grads.items()}
        v = {n: beta2 * v[n] + (1 - beta2) * g * g for n, g in grads.items()}
        new = {}
        for n, p in params.items():
            denominator = safe_sqrt(v[n]) / correction2 + self.cfg.adam_eps
            new[n] = p - self.step_size(n, lr) / correction1 * m[n] / denominator
        return new, (lr, m, v, t)

    def export_state(self, state: Any) -> dict[str, Tensor]:
        _, m, v, taken = state
        return {
            **{f"m__{slot(n)}": m[n] for n in self.names},
            **{f"v__{slot(n)}": v[n] for n in self.names},
            "t": torch.tensor(taken, dtype=torch.long),
        }

    def import_state(self, tensors: dict[str, Tensor], lr: float) -> Any:
        m = {n: tensors[f"m__{slot(n)}"] for n in self.names}
        v = {n: tensors[f"v__{slot(n)}"] for n in self.names}
        return self.cfg.adam_lr or lr, m, v, int(tensors["t"])

    def scalars(self) -> dict[str, float]:
        if self.beta_logits is None:
            return {}
        beta1, beta2 = torch.sigmoid(self.beta_logits.detach()).tolist()
        return {**super().scalars(), "beta1": beta1, "beta2": beta2}
