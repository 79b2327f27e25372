"""MetaOptNet: a linear classifier solved per task as a convex problem, differentiated
through its optimality conditions (Lee et al. 2019, CVPR; kjunelee/MetaOptNet).

``algo.head=svm`` is the code's ``MetaOptNetHead_SVM_CS``: the dual of Crammer and
Singer's multi-class SVM over the support embeddings, a quadratic program of S x ways
variables solved for all tasks at once by qpth's batched interior-point method (an
optional extra, as the reference uses it), with ``algo.qp_iterations`` iterations in
training and ``algo.test_qp_iterations`` at validation and meta-test (the code's 15 and
3). ``algo.head=ridge`` is ``MetaOptNetHead_Ridge``, whose QP has no constraints: its
optimum in closed form (the S x S dual system). ``algo.head=proto`` is the code's
``ProtoNetHead``: minus the squared distance to each class mean, divided by the embedding's
dimension (the paper's "ProtoNets (our backbone)" rows). Scores are multiplied by a learned scale
(initially 1) and trained with label smoothing (``algo.label_smoothing``).
docs/metaoptnet.md lists the settings and the deviations.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.heads import HeadAlgorithm, one_hot, ridge_scores
from metacli.config import require, require_at_least
from metacli.extras import require_extra
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution

HEADS = ("svm", "ridge", "proto")
# Elements of one batched KKT system qpth factorises at once; larger batches of tasks
# (20-way tests) are solved in consecutive groups so that no setting exhausts memory.
KKT_ELEMENTS = 2**26
JITTER = 1e-5
log = logging.getLogger(__name__)


@dataclass
class MetaOptNetConfig(AlgoConfig):
    name: str = "metaoptnet"
    head: str = "svm"  # svm (Crammer-Singer, by QP) | ridge (closed form) | proto
    c_reg: float = 0.1  # the SVM's C
    lam: float = 50.0  # the ridge head's lambda
    qp_iterations: int = 15  # interior-point iterations in training (qpth's maxIter)
    test_qp_iterations: int = 3  # at validation and meta-test (test.py: maxIter=3)
    label_smoothing: float = 0.1  # training's epsilon (train.py --eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.head in HEADS, "algo.head", self.head, f"choose one of {', '.join(HEADS)}")
        require(self.c_reg > 0, "algo.c_reg", self.c_reg, "the SVM's C must be > 0")
        require(self.lam > 0, "algo.lam", self.lam, "the ridge lambda must be > 0")
        require_at_least("algo.qp_iterations", self.qp_iterations, 1)
        require_at_least("algo.test_qp_iterations", self.test_qp_iterations, 1)
        require(
            0 <= self.label_smoothing < 1,
            "algo.label_smoothing",
            self.label_smoothing,
            "it must be in [0, 1)",
        )


def svm_cs_dual(
    support: Tensor, support_y: Tensor, ways: int, c_reg: float, iterations: int
) -> Tensor:
    """The Crammer-Singer SVM's dual variables alpha [T, S, ways] of each task:

        min_alpha 1/2 sum_m ||sum_i alpha_im x_i||^2 - sum_i alpha_{i, y_i}
        s.t. alpha_im <= C [m = y_i],  sum_m alpha_im = 0,

    the QP of the code (variables ordered example-major: kron(K, I_ways)), solved by qpth.
    """
    from qpth.qp import QPFunction

    tasks, examples = support_y.shape
    n = examples * ways
    kernel = support @ support.transpose(-1, -2)  # [T, S, S]
    # qpth factorises Q by Cholesky: support embeddings that are linearly dependent (fewer
    # features than examples, dead units) make it singular, where the reference fails;
    # a ridge of 1e-5 of the mean squared norm keeps it definite and changes nothing else
    scale = kernel.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    kernel = kernel + JITTER * scale[:, None, None] * torch.eye(examples).to(kernel)
    eye_ways = torch.eye(ways, dtype=support.dtype, device=support.device)
    quadratic = torch.einsum("tij,mn->timjn", kernel, eye_ways).reshape(tasks, n, n)
    labels = one_hot(support_y, ways, support.dtype).reshape(tasks, n)
    eye_n = torch.eye(n, dtype=support.dtype, device=support.device).expand(tasks, n, n)
    equality = torch.kron(
        torch.eye(examples, dtype=support.dtype, device=support.device),
        torch.ones(1, ways, dtype=support.dtype, device=support.device),
    ).expand(tasks, examples, n)
    zeros = support.new_zeros(tasks, examples)
    solve = QPFunction(verbose=False, maxIter=iterations)
    with warnings.catch_warnings():  # qpth's own deprecated torch calls
        warnings.simplefilter("ignore")
        alpha = solve(quadratic, -labels, eye_n, c_reg * labels, equality, zeros)
    return alpha.reshape(tasks, examples, ways)


def robust_dual(
    support: Tensor, support_y: Tensor, ways: int, cfg: MetaOptNetConfig, iterations: int
) -> Tensor:
    """``svm_cs_dual`` for a batch of tasks. Where qpth's batched LU factorisation fails
    (it raises "Pivots given to lu_solve..."; seen here on well-conditioned batches that
    solve one task at a time, after other work in the process), each task is solved
    alone, in float64 if it fails again, and a task that fails even so gets NaN: reported
    as diverged, never a stopped run."""
    try:
        return svm_cs_dual(support, support_y, ways, cfg.c_reg, iterations)
    except RuntimeError as err:
        log.warning(
            "qpth failed on a batch of %d QPs (%s); solving them one by one", len(support), err
        )
    parts = []
    for i in range(len(support)):
        one, labels = support[i : i + 1], support_y[i : i + 1]
        try:
            parts.append(svm_cs_dual(one, labels, ways, cfg.c_reg, iterations))
            continue
        except RuntimeError:
            pass
        try:
            alpha = svm_cs_dual(one.double(), labels, ways, cfg.c_reg, iterations)
            parts.append(alpha.to(support.dtype))
        except RuntimeError:
            log.warning("qpth cannot solve task %d's QP: it is reported as diverged", i)
            parts.append(one.new_full((1, labels.shape[1], ways), float("nan")))
    return torch.cat(parts)


class MetaOptNet(HeadAlgorithm, key="metaoptnet"):
    Config: ClassVar[type[AlgoConfig]] = MetaOptNetConfig
    cfg: MetaOptNetConfig

    def __init__(self, cfg: MetaOptNetConfig, model: Model, task: TaskDistribution) -> None:
        if cfg.head == "svm":
            require_extra("qpth", "algo=metaoptnet with algo.head=svm")
        super().__init__(cfg, model, task)
        self.scale = nn.ParameterDict({"scale": nn.Parameter(torch.tensor(1.0))})

    @classmethod
    def head_bytes(
        cls, cfg: AlgoConfig, ways: int, support: int, queries: int, features: tuple[int, ...]
    ) -> int:
        if not isinstance(cfg, MetaOptNetConfig) or cfg.head != "svm":
            return 4 * support * support * 3
        # qpth's KKT system over S x ways variables, its inequalities and equalities, and
        # the few matrices of that size its factorisation and backward pass keep
        n = support * ways
        return 4 * (2 * n + support) ** 2 * 6

    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        support, query = support.flatten(2), query.flatten(2)
        if self.cfg.head == "ridge":
            # the QP's optimum z = 2 (K + lam I)^-1 Y, in closed form
            targets = 2 * one_hot(support_y, ways, support.dtype)
            scores = ridge_scores(support, targets, self.cfg.lam, query)
        elif self.cfg.head == "proto":
            members = one_hot(support_y, ways, support.dtype).transpose(1, 2)  # [T, ways, S]
            prototypes = (members @ support) / members.sum(-1, keepdim=True)
            scores = -torch.cdist(query, prototypes).square() / query.shape[-1]
        else:
            iterations = self.cfg.qp_iterations if self.training else self.cfg.test_qp_iterations
            n = support.shape[1] * ways
            group = max(1, KKT_ELEMENTS // (3 * n) ** 2)
            # a task whose embeddings diverged gets NaN scores (reported as diverged);
            # qpth itself would stop the run ("Q is not SPD")
            solvable = torch.isfinite(support).flatten(1).all(1)
            alpha = support.new_full((*support_y.shape, ways), float("nan"))
            kept = solvable.nonzero().squeeze(1)
            for i in range(0, len(kept), group):
                rows = kept[i : i + group]
                alpha = alpha.index_put(
                    (rows,), robust_dual(support[rows], support_y[rows], ways, self.cfg, iterations)
                )
            scores = (query @ support.transpose(-1, -2)) @ alpha
        return self.scale["scale"] * scores

    def training_losses(self, scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        eps = self.cfg.label_smoothing
        target = one_hot(query_y, ways, scores.dtype)
        target = target * (1 - eps) + (1 - target) * eps / (ways - 1)  # as train.py
        return -(target * scores.log_softmax(-1)).sum(-1).mean(-1)

    def scalars(self) -> dict[str, float]:
        return {"scale": float(self.scale["scale"].detach())}
