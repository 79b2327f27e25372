"""R2D2: ridge regression as the per-task learner (Bertinetto et al. 2019, ICLR).

As bertinetto/r2d2's ``RRNet``: each task's support embeddings, with a column of ones for
a bias, and its one-hot labels, both divided by sqrt(S), are fitted by ridge regression in
closed form (the S x S Woodbury system when there are fewer examples than features, as
every few-shot task on a CNN), the query scored by the solution, and the scores passed
through a learned scale and bias (``AdjustLayer``) into a cross-entropy. The network, the
scale and bias (and lambda with ``algo.learn_lambda``) are meta-learned through the solve.
docs/r2d2.md lists the settings and the deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.heads import HeadAlgorithm, one_hot, ridge_scores
from metacli.config import require
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class R2D2Config(AlgoConfig):
    name: str = "r2d2"
    lam: float = 50.0  # ridge regularisation lambda (the code's init_lambda)
    learn_lambda: bool = False  # true: lambda is meta-learned
    lambda_base: float = 1.0  # != 1: lambda = lambda_base ** (a learned exponent)
    # scores = scale * (query @ W + b) + bias, both learned; the code's init_adj_scale:
    # 1e-4 on mini-ImageNet and CIFAR-FS, 10 on Omniglot
    adj_scale: float = 1e-4
    adj_bias: float = 0.0
    adj_base: float = 1.0  # != 1: scores * base ** scale + base ** bias - 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lam > 0, "algo.lam", self.lam, "the ridge lambda must be > 0")
        for key in ("lambda_base", "adj_base"):
            value = getattr(self, key)
            require(value > 0, f"algo.{key}", value, "a base must be > 0 (1: no exponent)")


class R2D2(HeadAlgorithm, key="r2d2"):
    Config: ClassVar[type[AlgoConfig]] = R2D2Config
    cfg: R2D2Config
    lam: Tensor

    def __init__(self, cfg: R2D2Config, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        # lambda as the code parametrises it: the value itself, or base ** exponent
        start = cfg.lam if cfg.lambda_base == 1 else math.log(cfg.lam, cfg.lambda_base)
        self.adjust = nn.ParameterDict(
            {
                "scale": nn.Parameter(torch.tensor(float(cfg.adj_scale))),
                "bias": nn.Parameter(torch.tensor(float(cfg.adj_bias))),
            }
        )
        lam = torch.tensor(float(start))
        if cfg.learn_lambda:  # meta-learned with the scale and bias (the "adjust" group)
            self.adjust["lam"] = nn.Parameter(lam)
        else:
            self.register_buffer("lam", lam)

    def ridge_lambda(self) -> Tensor:
        lam: Tensor = self.adjust["lam"] if self.cfg.learn_lambda else self.lam
        base = self.cfg.lambda_base
        return lam if base == 1 else torch.pow(base, lam)

    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        support, query = support.flatten(2), query.flatten(2)
        root = math.sqrt(support.shape[1])  # the code divides X and Y by sqrt(S)
        targets = one_hot(support_y, ways, support.dtype) / root
        scores = ridge_scores(
            support, targets, self.ridge_lambda(), query, bias=True, scale=1 / root
        )
        scale, bias = self.adjust["scale"], self.adjust["bias"]
        if self.cfg.adj_base == 1:
            return scores * scale + bias
        base = self.cfg.adj_base
        return scores * base**scale + base**bias - 1

    def scalars(self) -> dict[str, float]:
        return {
            "adj_scale": float(self.adjust["scale"].detach()),
            "adj_bias": float(self.adjust["bias"].detach()),
            "lambda": float(self.ridge_lambda().detach()),
        }
