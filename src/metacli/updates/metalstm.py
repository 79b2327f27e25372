"""The LSTM meta-learner of Ravi & Larochelle 2017 ("Optimization as a model for few-shot
learning") as an inner-loop update rule: the learner's parameters are the cell state of a
coordinate-wise LSTM.

Per coordinate (every element of every adapted tensor, weights shared across them):

    x_t = [preprocess(loss_t), preprocess(grad_t)]          # 4 numbers
    h_t = LSTM_1(x_t, h_{t-1})                              # `lstm_hidden` units (20)
    f_t = W_F [h_t, theta_{t-1}, f_{t-1}] + b_F             # before the sigmoid, fed back
    i_t = W_I [h_t, theta_{t-1}, i_{t-1}] + b_I
    theta_t = sigmoid(f_t) * theta_{t-1} - sigmoid(i_t) * grad_t

as the authors' code (twitter-research/meta-learning-lstm, model/lstm/lstm-helper.lua and
meta-learner-lstm.lua) computes it. Preprocessing (Andrychowicz et al. 2016, p = 10):
x -> (log|x| / p, sign x) if |x| >= e^-p, else (-1, e^p x). The initial cell state theta_0
is the meta-learned initialisation (the model's parameters). Weights start U(-0.01, 0.01),
b_F ~ U(4, 5) and b_I ~ U(-5, -4), so the first updates are small gradient steps that keep
the parameters. The gradient and the loss enter as constants (the algorithm takes them
first order); the meta-gradient flows through theta and the gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateConfig, UpdateRule


@dataclass
class MetaLSTMRuleConfig(UpdateConfig):
    lstm_hidden: int = 20  # units of the first LSTM (the paper: 20)
    preprocess_p: float = 10.0  # p of the gradient/loss preprocessing
    # The gradient is divided by this before the LSTM sees it: the authors' learner divides
    # the mean loss's gradient by the mini-batch size once more (feval's gradParameters:div).
    gradient_divisor: float = 1.0

    def __post_init__(self) -> None:
        require(self.lstm_hidden >= 1, "algo.lstm_hidden", self.lstm_hidden, "it must be >= 1")
        require(self.preprocess_p > 0, "algo.preprocess_p", self.preprocess_p, "it must be > 0")
        require(
            self.gradient_divisor > 0,
            "algo.gradient_divisor",
            self.gradient_divisor,
            "it must be > 0",
        )


def preprocess(x: Tensor, p: float) -> Tensor:
    """[...] -> [..., 2]: (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x)."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, -1.0)
    sign = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([magnitude, sign], dim=-1)


class MetaLSTMRule(UpdateRule, key="metalstm"):
    Config = MetaLSTMRuleConfig
    needs_loss = True

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        hidden = cfg.lstm_hidden

        def uniform(*shape: int, low: float = -0.01, high: float = 0.01) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape).uniform_(low, high))

        # LSTM_1 on the 4 preprocessed inputs; gates in torch's order (input, forget, cell, output)
        self.lstm_in = uniform(4 * hidden, 4)
        self.lstm_hh = uniform(4 * hidden, hidden)
        self.lstm_bias = uniform(4 * hidden)
        # the meta-learner cell: weights over [h, theta, previous gate]
        self.forget_weight = uniform(hidden + 2)
        self.forget_bias = uniform(1, low=4.0, high=5.0)
        self.input_weight = uniform(hidden + 2)
        self.input_bias = uniform(1, low=-5.0, high=-4.0)

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        """LSTM_1's hidden and cell states and the two gates, per coordinate, all zero."""
        first = next(iter(params.values()))
        count = sum(p.numel() for p in params.values())
        hidden = first.new_zeros(count, self.cfg.lstm_hidden)
        gate = first.new_zeros(count)
        return hidden, hidden, gate, gate

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        assert loss is not None  # needs_loss
        h, c, f_prev, i_prev = state
        theta = torch.cat([params[n].reshape(-1) for n in self.names])  # [N]
        grad = torch.cat([grads[n].reshape(-1) for n in self.names])  # [N]
        grad = grad / self.cfg.gradient_divisor
        p = self.cfg.preprocess_p
        x = torch.cat([preprocess(loss, p).expand(len(grad), 2), preprocess(grad, p)], 1)
        gates = F.linear(x, self.lstm_in) + F.linear(h, self.lstm_hh) + self.lstm_bias
        i1, f1, g1, o1 = gates.chunk(4, dim=1)  # [N, hidden] each
        c = torch.sigmoid(f1) * c + torch.sigmoid(i1) * torch.tanh(g1)
        h = torch.sigmoid(o1) * torch.tanh(c)
        f = torch.cat([h, theta[:, None], f_prev[:, None]], 1) @ self.forget_weight
        f = f + self.forget_bias
        i = torch.cat([h, theta[:, None], i_prev[:, None]], 1) @ self.input_weight
        i = i + self.input_bias
        theta = torch.sigmoid(f) * theta - torch.sigmoid(i) * grad
        new, start = {}, 0
        for n in self.names:
            size = params[n].numel()
            new[n] = theta[start : start + size].reshape(params[n].shape)
            start += size
        return new, (h, c, f, i)

    def terms(self, state: Any) -> dict[str, Tensor]:
        """The mean forget and input gates (after the sigmoid) of the task's last update."""
        _, _, forget, input_gate = state
        return {
            "forget_gate": torch.sigmoid(forget).mean(),
            "input_gate": torch.sigmoid(input_gate).mean(),
        }

    def scalars(self) -> dict[str, float]:
        """The gates' biases through the sigmoid: where forgetting and the step size start."""
        return {
            "forget_gate_bias": torch.sigmoid(self.forget_bias.detach()).item(),
            "input_gate_bias": torch.sigmoid(self.input_bias.detach()).item(),
        }
