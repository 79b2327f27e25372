"""ResNet-12 of the few-shot literature (TADAM, Oreshkin et al. 2018; MetaOptNet, Lee et al. 2019).

Four residual blocks of widths 64-160-320-640; each is three 3x3 convolutions with batch
norm and leaky ReLU (slope 0.1), a 1x1 convolution shortcut, and 2x2 max-pooling; the
features are averaged over space (640-d; ``readout: flatten`` keeps the maps, as
MetaOptNet), then a linear head. DropBlock regularisation
of MetaOptNet is not included. Batch norm is ``MetaBatchNorm`` (see conv4).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from metacli.config import require
from metacli.models.base import NORMS, MetaBatchNorm, Model, ModelConfig


@dataclass
class ResNet12Config(ModelConfig):
    name: str = "resnet12"
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    norm: str = "transductive"
    norm_steps: int = 6
    # mean: features averaged over space (640-d); flatten: the last block's maps
    # flattened (MetaOptNet's network: no global average pooling, 16,000-d at 84 x 84)
    readout: str = "mean"

    def __post_init__(self) -> None:
        require(
            self.readout in ("mean", "flatten"),
            "model.readout",
            self.readout,
            "choose mean or flatten",
        )
        require(
            len(self.widths) == 4 and min(self.widths) >= 1,
            "model.widths",
            self.widths,
            "four widths >= 1",
        )
        require(self.norm in NORMS, "model.norm", self.norm, f"choose one of {', '.join(NORMS)}")
        require(self.norm_steps >= 1, "model.norm_steps", self.norm_steps, "it must be >= 1")


class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, cfg: ResNet12Config) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(
                channels_in if i == 0 else channels_out, channels_out, 3, padding=1, bias=False
            )
            for i in range(3)
        )
        self.norms = nn.ModuleList(
            MetaBatchNorm(channels_out, cfg.norm, cfg.norm_steps) for _ in range(3)
        )
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.shortcut_norm = MetaBatchNorm(channels_out, cfg.norm, cfg.norm_steps)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            out = norm(conv(out))
            if i < 2:
                out = F.leaky_relu(out, 0.1)
        out = F.leaky_relu(out + self.shortcut_norm(self.shortcut(x)), 0.1)
        return F.max_pool2d(out, 2)


class ResNet12(Model, key="resnet12"):
    inputs = "images"
    Config = ResNet12Config
    preferred_batching = {"cpu": "loop", "cuda": "vmap"}

    def __init__(self, cfg: ResNet12Config, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        widths = [input_shape[0], *cfg.widths]
        self.blocks = nn.Sequential(
            *(ResidualBlock(a, b, cfg) for a, b in itertools.pairwise(widths))
        )
        side = [int(n) for n in input_shape[1:]]
        for _ in range(4):  # each block halves the resolution (floor)
            side = [n // 2 for n in side]
        self.map_shape = (cfg.widths[-1], *side)
        self.flatten = cfg.readout == "flatten"
        self.feature_dim = cfg.widths[-1] * (side[0] * side[1] if self.flatten else 1)
        self.head = nn.Linear(self.feature_dim, output_dim) if output_dim else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def features(self, x: Tensor) -> Tensor:  # [N, C, H, W] -> [N, 640] (mean)
        maps = self.blocks(x)
        return maps.flatten(1) if self.flatten else maps.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features
