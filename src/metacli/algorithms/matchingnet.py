"""Matching Networks (Vinyals et al. 2016), as wyharveychen/CloserLookFewShot's MatchingNet.

A query is classified by attention over the support set: the softmax of its cosine
similarities to the support embeddings (rectified and scaled by 100, as that code),
which mixes the support labels into class probabilities; the loss is their negative log.
With the full context embeddings (``algo.fce``, the code's default) the support set is
re-embedded by a bidirectional LSTM run over it (g: x + forward + backward states), and
each query by an attention LSTM that reads the support set for S steps (f). All tasks of
a batch run together: the LSTMs take the tasks as their batch. docs/matchingnet.md lists
the settings and the deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.heads import HeadAlgorithm, one_hot
from metacli.config import require
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class MatchingNetConfig(AlgoConfig):
    name: str = "matchingnet"
    fce: bool = True  # full context embeddings (both LSTMs); false: plain cosine attention
    scale: float = 100.0  # cosine similarities are rectified and multiplied by it

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.scale > 0, "algo.scale", self.scale, "it must be > 0")


def normalized(x: Tensor) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-5)  # (the code's epsilon)


class ContextEmbedding(nn.Module):
    """The two LSTMs of the full context embeddings, over a batch of tasks."""

    param_group = "fce"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, 1, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def support(self, s: Tensor) -> Tensor:  # [T, S, D] -> g [T, S, D]
        out = self.support_lstm(s)[0]
        dim = s.shape[-1]
        return s + out[..., :dim] + out[..., dim:]

    def query(self, f: Tensor, g: Tensor) -> Tensor:  # f [T, Q, D], g [T, S, D] -> [T, Q, D]
        tasks, queries, dim = f.shape
        h, c = f, torch.zeros_like(f)
        for _ in range(g.shape[1]):  # S read steps, as the code (K = |support|)
            attention = (h @ g.transpose(-1, -2)).softmax(-1)  # [T, Q, S]
            read = attention @ g
            x = torch.cat([f, read], -1).reshape(tasks * queries, 2 * dim)
            h, c = self.query_cell(x, (h.reshape(-1, dim), c.reshape(-1, dim)))
            h, c = h.view(tasks, queries, dim) + f, c.view(tasks, queries, dim)
        return h


class MatchingNet(HeadAlgorithm, key="matchingnet"):
    Config: ClassVar[type[AlgoConfig]] = MatchingNetConfig
    cfg: MatchingNetConfig

    def __init__(self, cfg: MatchingNetConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        if cfg.fce:
            dim = getattr(model, "feature_dim", None)
            if dim is None:
                raise ConfigError(
                    f"algo.fce=true needs the width of model={model.cfg.name}'s embedding, "
                    f"which it does not declare (feature_dim). Set algo.fce=false or "
                    f"choose model=conv4 or resnet12."
                )
            self.context = ContextEmbedding(int(dim))

    @classmethod
    def head_bytes(
        cls, cfg: AlgoConfig, ways: int, support: int, queries: int, features: tuple[int, ...]
    ) -> int:
        dim = math.prod(features)
        attention = 4 * queries * support * 3
        if not (isinstance(cfg, MatchingNetConfig) and cfg.fce):
            return attention
        # the attention LSTM's S read steps, each keeping its attention and gates
        return attention + 4 * support * queries * (support + 8 * dim)

    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Log-probabilities [T, Q, ways]: log(attention @ one-hot labels + 1e-6)."""
        g, f = support.flatten(2), query.flatten(2)
        if self.cfg.fce:
            g = self.context.support(g)
            f = self.context.query(f, g)
        similarity = F.relu(normalized(f) @ normalized(g).transpose(-1, -2)) * self.cfg.scale
        labels = one_hot(support_y, ways, similarity.dtype)  # [T, S, ways]
        return (similarity.softmax(-1) @ labels + 1e-6).log()

    def episode_losses(self, scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        """The negative log-probability of each query's class (the code's NLLLoss)."""
        return -scores.gather(-1, query_y.unsqueeze(-1)).squeeze(-1).mean(-1)
