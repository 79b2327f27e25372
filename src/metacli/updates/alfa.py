"""ALFA (Baik et al. 2020, "Meta-learning with adaptive hyperparameters") as an update rule:
a small network generates the inner loop's learning rate and weight decay for each task
and each step from the task's current state.

At inner step j, for the L adapted tensors (layers) l:

    tau_j = [mean(theta_1), ..., mean(theta_L), mean(g_1), ..., mean(g_L)]   # 2L numbers
    (alpha_hat, beta_hat) = Linear(2L, 2L) - ReLU - Linear(2L, 2L) (tau_j)   # L each
    theta_l <- (1 - beta_hat_l * beta_{l,j}) * theta_l - alpha_hat_l * alpha_{l,j} * g_l

with meta-learned per-layer, per-step alpha (initialised to the inner learning rate) and
beta (initialised to ``alfa_weight_decay`` x the inner learning rate), as the authors' code
(baiksung/ALFA, few_shot_learning_system.py and inner_loop_optimizers.py) does: the
gradients in tau are detached (the weights' means are not), the generator's outputs are
used as they come (no activation), and the generator's weights keep torch's default
initialisation. With ``algo.init=random`` (the algorithm ``alfa``) the initialisation is
not meta-learned and each parameter element gets its own learned decay factor (initialised
to ``alfa_weight_decay`` x lr) with per-layer, per-step betas initialised to 1.
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
class ALFARuleConfig(UpdateConfig):
    alfa_weight_decay: float = 5e-4  # beta's start, in units of the inner learning rate

    def __post_init__(self) -> None:
        require(
            self.alfa_weight_decay >= 0,
            "algo.alfa_weight_decay",
            self.alfa_weight_decay,
            "it must be >= 0",
        )


def task_state(params: Params, grads: Params) -> Tensor:
    """tau [2L]: each tensor's mean, then each gradient's mean (the gradients detached)."""
    means = [p.mean() for p in params.values()]
    return torch.stack(means + [grads[n].detach().mean() for n in params])


class ALFARule(UpdateRule, key="alfa"):
    Config = ALFARuleConfig
    exact = False  # the generator reads detached gradients (as the authors' code)

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.steps = steps
        self.random_init = getattr(cfg, "init", "learned") == "random"
        decay = cfg.alfa_weight_decay * lr
        size = 2 * len(params)
        self.generator = nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Linear(size, size))
        self.alpha = nn.ParameterDict(
            {slot(n): nn.Parameter(torch.full((steps + 1,), lr)) for n in params}
        )
        start = 1.0 if self.random_init else decay
        self.beta = nn.ParameterDict(
            {slot(n): nn.Parameter(torch.full((steps + 1,), start)) for n in params}
        )
        if self.random_init:
            self.beta_per_param = nn.ParameterDict(
                {slot(n): nn.Parameter(torch.full(p.shape, decay)) for n, p in params.items()}
            )

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return ()  # the generated (mean alpha_hat, mean beta_hat) of each step so far

    def generate(self, params: Params, grads: Params) -> tuple[Tensor, Tensor]:
        """alpha_hat [L] and beta_hat [L] for this task and step."""
        out = self.generator(task_state(params, grads))
        return out[: len(self.names)], out[len(self.names) :]

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        j = min(step, self.steps)  # evaluation steps beyond training reuse the last
        alpha_hat, beta_hat = self.generate(params, grads)
        new = {}
        for layer, name in enumerate(self.names):
            decay = beta_hat[layer] * self.beta[slot(name)][j]
            if self.random_init:
                decay = decay * self.beta_per_param[slot(name)]
            rate = alpha_hat[layer] * self.alpha[slot(name)][j]
            new[name] = (1 - decay) * params[name] - rate * grads[name]
        return new, (*state, torch.stack([alpha_hat.mean(), beta_hat.mean()]))

    def terms(self, state: Any) -> dict[str, Tensor]:
        """The generated multipliers, averaged over the layers, at each inner step."""
        out = {}
        for j, (alpha_hat, beta_hat) in enumerate(state):
            out[f"alpha_hat_step{j}"], out[f"beta_hat_step{j}"] = alpha_hat, beta_hat
        return out

    def rates(self) -> dict[str, Tensor]:
        return {n: self.alpha[slot(n)] for n in self.names}

    def scalars(self) -> dict[str, float]:
        alpha = torch.stack([a.detach() for a in self.alpha.values()])  # [L, steps + 1]
        beta = torch.stack([b.detach() for b in self.beta.values()])
        per_step = {f"alfa_alpha_step{j}": v.item() for j, v in enumerate(alpha.mean(0))}
        return {
            "alfa_alpha_mean": alpha.mean().item(),
            "alfa_beta_mean": beta.mean().item(),
            **per_step,
        }
