"""Relation Networks (Sung et al. 2018, CVPR; floodsung/LearningToCompare_FSL).

A learned relation module scores each (class, query) pair: the class's support feature
maps pooled (summed over its shots, as the code; ``algo.class_pool: mean`` as
CloserLookFewShot) are concatenated with the query's along the channels, then two blocks
of 3x3 convolution, batch norm, ReLU and 2x2 max-pooling, a linear layer to
``algo.hidden`` units with ReLU, and one to a sigmoid relation score; training regresses
the scores on the one-hot labels (MSE). The network must keep spatial feature maps
(``model=conv4 model.pool_blocks=2``, or ``model.readout=flatten``). The module's batch
norm takes each task's own statistics, so all tasks of a batch run together.
docs/relationnet.md lists the settings and the deviations.
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

POOLS = ("sum", "mean")


@dataclass
class RelationNetConfig(AlgoConfig):
    name: str = "relationnet"
    hidden: int = 8  # units of the relation module's first linear layer
    class_pool: str = "sum"  # sum (floodsung's code) | mean (CloserLookFewShot) of the shots

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.hidden >= 1, "algo.hidden", self.hidden, "it must be >= 1")
        require(
            self.class_pool in POOLS,
            "algo.class_pool",
            self.class_pool,
            f"choose one of {', '.join(POOLS)}",
        )


class RelationModule(nn.Module):
    """Two convolution blocks and two linear layers over [T, P, 2C, h, w] pairs."""

    param_group = "relation"

    def __init__(self, channels: int, side: tuple[int, int], hidden: int) -> None:
        super().__init__()
        # padding 1 on maps smaller than 10 x 10 (Omniglot's 5 x 5), else 0: the code's
        self.padding = 1 if max(side) < 10 else 0
        self.convs = nn.ModuleList(
            [nn.Conv2d(2 * channels, channels, 3), nn.Conv2d(channels, channels, 3)]
        )
        self.norm_weight = nn.Parameter(torch.ones(2, channels))
        self.norm_bias = nn.Parameter(torch.zeros(2, channels))
        h, w = side
        for _ in range(2):
            h, w = (h + 2 * self.padding - 2) // 2, (w + 2 * self.padding - 2) // 2
        if h < 1 or w < 1:
            raise ConfigError(
                f"The feature maps ({channels} x {side[0]} x {side[1]}) are too small for "
                f"the relation module's two poolings. Keep more resolution: "
                f"model.pool_blocks=2 (conv4) or larger images."
            )
        self.fc1 = nn.Linear(channels * h * w, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        for conv in self.conv_layers():  # floodsung's weights_init
            n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / n))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.ones_(fc.bias)

    def conv_layers(self) -> list[nn.Conv2d]:
        return [conv for conv in self.convs if isinstance(conv, nn.Conv2d)]

    def forward(self, pairs: Tensor) -> Tensor:  # [T, P, 2C, h, w] -> [T, P]
        tasks, count = pairs.shape[:2]
        x = pairs.flatten(0, 1)
        for i, conv in enumerate(self.conv_layers()):
            x = F.conv2d(x, conv.weight, conv.bias, padding=self.padding)
            x = x.view(tasks, count, *x.shape[1:])
            # batch norm with each task's statistics over its pairs (train and test, as
            # the code, which never switches the module to eval)
            mean = x.mean(dim=(1, 3, 4), keepdim=True)
            var = x.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
            x = (x - mean) * torch.rsqrt(var + 1e-5)
            x = x * self.norm_weight[i].view(1, 1, -1, 1, 1) + self.norm_bias[i].view(
                1, 1, -1, 1, 1
            )
            x = F.max_pool2d(F.relu(x).flatten(0, 1), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return torch.sigmoid(self.fc2(x)).view(tasks, count)


class RelationNet(HeadAlgorithm, key="relationnet"):
    Config: ClassVar[type[AlgoConfig]] = RelationNetConfig
    cfg: RelationNetConfig

    def __init__(self, cfg: RelationNetConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        shape = getattr(model, "map_shape", None)
        flat = getattr(model, "feature_dim", None)
        if shape is None or len(shape) != 3 or flat != math.prod(shape):
            raise ConfigError(
                f"algo=relationnet compares feature maps, but model={model.cfg.name} "
                f"gives none (or averages them away). Use model=conv4 (with "
                f"model.pool_blocks=2 and model.readout=flatten, as the presets) or "
                f"model=resnet12 model.readout=flatten."
            )
        channels, height, width = (int(n) for n in shape)
        self.map_shape = (channels, height, width)
        self.relation = RelationModule(channels, (height, width), cfg.hidden)

    @classmethod
    def head_bytes(
        cls, cfg: AlgoConfig, ways: int, support: int, queries: int, features: tuple[int, ...]
    ) -> int:
        # every (class, query) pair's concatenated maps, and the module's activations on it
        return 4 * queries * ways * 2 * math.prod(features) * 3

    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        tasks, queries = query.shape[:2]
        labels = one_hot(support_y, ways, support.dtype)  # [T, S, ways]
        per_class = labels.transpose(1, 2) @ support.flatten(2)  # [T, ways, D]: sums
        if self.cfg.class_pool == "mean":
            per_class = per_class / labels.sum(1).unsqueeze(-1)
        classes = per_class.view(tasks, ways, *self.map_shape)
        queries_ = query.view(tasks, queries, *self.map_shape)
        pairs = torch.cat(  # [T, Q, ways, 2C, h, w]: (class, query) along the channels
            [
                classes.unsqueeze(1).expand(-1, queries, -1, -1, -1, -1),
                queries_.unsqueeze(2).expand(-1, -1, ways, -1, -1, -1),
            ],
            dim=3,
        )
        return self.relation(pairs.flatten(1, 2)).view(tasks, queries, ways)

    def episode_losses(self, scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        """MSE between the relation scores and the one-hot labels (the code's loss)."""
        target = one_hot(query_y, ways, scores.dtype)
        return (scores - target).square().flatten(1).mean(1)
