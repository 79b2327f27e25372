"""The base of the algorithms whose per-task learner is a head fitted to the support set's
embeddings, with no inner loop on the network: Matching and Relation Networks, R2D2,
MetaOptNet (ProtoNets is the simplest of them, and keeps its own file).

Each task's examples are embedded by one forward pass of the shared network (the
executor maps it over the tasks); the head then runs on all tasks of the batch at once,
``head(support [T, S, ...], labels [T, S], query [T, Q, ...], ways) -> scores [T, Q,
ways]``, so closed-form and convex heads are batched solves. Training backpropagates the
mean of ``episode_losses`` through the head into the network (and the head's own
meta-parameters: scales, LSTMs, relation modules); validation and meta-test report each
task's loss and accuracy from the same scores.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.base import (
    AlgoConfig,
    Evaluation,
    MetaAlgorithm,
    MetaLoss,
    classification_task,
)
from metacli.models.base import Model
from metacli.models.fused import backward_once
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """[..., N] labels -> [..., N, ways] (by comparison: ``F.one_hot`` refuses vmap)."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def ridge_scores(
    x: Tensor,
    targets: Tensor,
    lam: Tensor | float,
    query: Tensor,
    bias: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """``[query, 1] @ W`` [T, Q, C] for the weights W minimising
    ||X W - targets||^2 + lam ||W||^2 of each task, X = scale x [x, 1] (x [T, S, D],
    targets [T, S, C]; the column of ones only with ``bias``: R2D2's).

    With no more examples than features (every few-shot task on a CNN's features) the
    Woodbury form W = X^T (X X^T + lam I_S)^-1 targets solves an S x S system, as R2D2 and
    MetaOptNet's ridge head; the scores are ([query, 1] X^T) (X X^T + lam I)^-1 targets,
    with neither W nor the column of ones ever formed. Otherwise the primal
    W = (X^T X + lam I)^-1 X^T targets.
    """
    examples, dim = x.shape[-2], x.shape[-1] + int(bias)
    if examples <= dim:
        gram = x @ x.transpose(-1, -2) + float(bias)
        cross = query @ x.transpose(-1, -2) + float(bias)
        eye = torch.eye(examples, dtype=x.dtype, device=x.device)
        return scale * cross @ torch.linalg.solve(scale**2 * gram + lam * eye, targets)
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
        query = torch.cat([query, query.new_ones(*query.shape[:-1], 1)], -1)
    x = scale * x
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(x.transpose(-1, -2) @ x + lam * eye, x.transpose(-1, -2) @ targets)
    return query @ weights


class HeadAlgorithm(MetaAlgorithm):
    """No inner loop: embed each task once, fit the head to the support set, score the query."""

    inner_loop = False  # an episode is one forward pass of the network
    uses_head = False  # the model is built as an embedding network
    Config: ClassVar[type[AlgoConfig]] = AlgoConfig

    def __init__(self, cfg: AlgoConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.classes = classification_task(task, cfg.name)

    # --- what a method defines ------------------------------------------------------------
    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Scores [T, Q, ways] of each task's query from its support embeddings."""
        raise NotImplementedError

    def episode_losses(self, scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        """Each task's loss [T] (cross-entropy of the scores; training and evaluation)."""
        return (
            F.cross_entropy(scores.flatten(0, 1), query_y.flatten(), reduction="none")
            .view(query_y.shape)
            .mean(1)
        )

    def training_losses(self, scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        """The loss training minimises (MetaOptNet smooths its labels); by default the same."""
        return self.episode_losses(scores, query_y, ways)

    # --- shared ---------------------------------------------------------------------------
    def embed(self, sx: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass over a task's support and query together, as the reference
        codes (batch norm sees both)."""
        out = self.executor.module()(torch.cat([sx, qx]))
        return out[: len(sx)], out[len(sx) :]

    def embeddings(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Support [B, S, ...] and query [B, Q, ...] embeddings of every task."""

        def one(rng: TaskRandom, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            with backward_once():  # the embeddings are backpropagated once
                support, query = self.embed(sx, qx)
            return torch.cat([support, query])

        if self.executor.strategy == "threads" and torch.is_grad_enabled():
            # worker threads run replicas of the network, whose graphs do not reach its
            # parameters: embeddings that training backpropagates are made in this thread
            tensors = zip(*batch.tensors(), strict=True)
            out = torch.stack([one(TaskRandom(None), *task) for task in tensors])
        else:
            out = self.executor.map(one, batch.keys, (), batch.tensors())
        shots = batch.support_x.shape[1]
        return out[:, :shots], out[:, shots:]

    @staticmethod
    def accuracy(scores: Tensor, query_y: Tensor) -> Tensor:
        return (scores.argmax(-1) == query_y).to(scores.dtype).mean(-1)

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        ways = self.classes.ways("train")
        support, query = self.embeddings(batch)
        scores = self.head(support, batch.support_y, query, ways)
        losses = self.training_losses(scores, batch.query_y, ways)
        return MetaLoss(losses.mean(), self.accuracy(scores, batch.query_y).detach())

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        ways = self.classes.ways("test")
        with torch.no_grad():
            support, query = self.embeddings(batch)
            scores = self.head(support, batch.support_y, query, ways)
            loss = self.episode_losses(scores, batch.query_y, ways)
        metric = self.accuracy(scores, batch.query_y)
        return Evaluation(
            loss.unsqueeze(1), metric.unsqueeze(1), scores.unsqueeze(1) if predictions else None
        )
