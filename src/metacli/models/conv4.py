"""Conv-4 of the few-shot literature (Vinyals et al. 2016; MAML; ProtoNets).

Four blocks of 3x3 convolution, batch norm, ReLU and 2x2 max-pooling (``filters``: 64
for Omniglot, 32 for mini-ImageNet), then a linear head. ``strided: true`` is the
variant of MAML's Omniglot code: stride-2 convolutions, no pooling, features averaged
over space (``readout: mean``); openai/supervised-reptile's Omniglot network is the same
but flattens them (``readout: flatten``: 2 x 2 x 64 = 256 features on 28 x 28 images).
``pool_padding: same`` pools as TF's 'SAME' padding (a ceiling: 84 -> 42 -> 21 -> 11 -> 6,
Reptile's mini-ImageNet network), ``valid`` as 'VALID' (a floor: ... 21 -> 10 -> 5, MAML's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.config import require
from metacli.errors import ConfigError
from metacli.models.base import NORMS, MetaBatchNorm, Model, ModelConfig, fused_is_exact
from metacli.models.fused import ConvNormPool, backpropagated_once, conv_norm_pool

READOUTS = ("auto", "mean", "flatten")


@dataclass
class Conv4Config(ModelConfig):
    name: str = "conv4"
    filters: int = 64
    strided: bool = False
    norm: str = "transductive"  # transductive | per_step | running | none
    norm_steps: int = 6  # per_step: parameter sets for inner steps 0..norm_steps-1
    # false: the norm learns a bias only, its scale fixed at 1, as MAML's TF code
    # (tf.contrib.layers.batch_norm: center=True, scale=False)
    norm_scale: bool = True
    readout: str = "auto"  # auto (strided: mean, else flatten) | mean | flatten
    pool_padding: str = "valid"  # valid (floor) | same (ceiling, TF's 'SAME')
    # how many leading blocks max-pool: 2 keeps the last two blocks' resolution, the
    # feature maps Relation Networks compare (CloserLook's Conv4NP: 84 -> 21 x 21)
    pool_blocks: int = 4
    # context parameters (CAVIA, algo=cavia): zeros, never meta-learned, adapted per task
    # by an inner loop that selects them; they condition the blocks listed in ``film``
    # (1-4) by FiLM, a linear map (``film_hidden``: 1 adds a hidden layer of 2 x filters
    # and ReLU) to a scale and shift per channel after the norm and pooling, before ReLU
    context: int = 0
    film: list[int] = field(default_factory=list)
    film_hidden: int = 0

    def __post_init__(self) -> None:
        require(self.filters >= 1, "model.filters", self.filters, "it must be >= 1")
        require(
            self.readout in READOUTS,
            "model.readout",
            self.readout,
            f"choose one of {', '.join(READOUTS)}",
        )
        require(
            self.pool_padding in ("valid", "same"),
            "model.pool_padding",
            self.pool_padding,
            "choose valid or same",
        )
        require(self.norm in NORMS, "model.norm", self.norm, f"choose one of {', '.join(NORMS)}")
        require(0 <= self.pool_blocks <= 4, "model.pool_blocks", self.pool_blocks, "0 to 4")
        require(self.norm_steps >= 1, "model.norm_steps", self.norm_steps, "it must be >= 1")
        require(self.context >= 0, "model.context", self.context, "it must be >= 0")
        require(
            all(b in (1, 2, 3, 4) for b in self.film) and len(set(self.film)) == len(self.film),
            "model.film",
            self.film,
            "list blocks among 1, 2, 3, 4, each once",
        )
        require(
            bool(self.film) == bool(self.context),
            "model.film",
            self.film,
            "give the blocks the context conditions (e.g. [3]) exactly when model.context > 0",
        )
        require(self.film_hidden in (0, 1), "model.film_hidden", self.film_hidden, "0 or 1")


class ConvBlock(nn.Module):
    def __init__(
        self, channels_in: int, channels_out: int, cfg: Conv4Config, pool: bool = True
    ) -> None:
        super().__init__()
        self.pool = pool and not cfg.strided
        self.ceil = cfg.pool_padding == "same"
        self.conv = nn.Conv2d(
            channels_in, channels_out, 3, stride=2 if cfg.strided else 1, padding=1
        )
        self.norm = MetaBatchNorm(channels_out, cfg.norm, cfg.norm_steps, scale=cfg.norm_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.fuses(x):  # the same numbers, faster and in less memory (models/fused.py)
            norm = self.norm
            scale = norm.selected(norm.weight) if norm.scale else None
            args = (x, self.conv.weight, self.conv.bias, scale, norm.selected(norm.bias))
            if not torch.is_grad_enabled():
                return conv_norm_pool(*args, norm.eps, self.ceil)
            return ConvNormPool.apply(*args, norm.eps, self.ceil)
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2, ceil_mode=self.ceil) if self.pool else x

    def conditioned(self, x: Tensor, film: Tensor) -> Tensor:
        """The block with a FiLM of its pooled, normalised output: ``film`` [2 x channels]
        is a scale then a shift per channel, applied before the ReLU (CAVIA's order)."""
        y = self.norm(self.conv(x))
        if self.pool:
            y = F.max_pool2d(y, 2, ceil_mode=self.ceil)
        scale, shift = film.reshape(2, -1, 1, 1)
        return F.relu(scale * y + shift)

    def fuses(self, x: Tensor) -> bool:
        """Whether this pass takes the block of models/fused.py: declared by the caller
        (``backward_once``: no graph, or one backpropagated once), pooling, and batch
        statistics from the fused kernel (outside any transform)."""
        return (
            backpropagated_once()
            and self.pool
            and self.norm.batch_statistics()
            and self.norm.affine
            and fused_is_exact(x)
        )


class Conv4(Model, key="conv4"):
    inputs = "images"
    Config = Conv4Config
    # Measured (docs/benchmarks.md): on a CPU, batched convolutions with per-task
    # weights are slower than a loop over tasks. Overlapping two tasks in threads is
    # faster still, but holds two tasks' graphs: see batching_for.
    preferred_batching = {"cpu": "threads", "cuda": "vmap"}

    def batching_for(self, device: torch.device, keeps_graphs: bool = True) -> str:
        """On a CPU, tasks that hold a graph run one at a time (``loop``): one graph in
        memory, as a per-task reference holds, where ``threads`` holds one per core for
        more speed (docs/benchmarks.md); graph-free tasks (Reptile) overlap."""
        preferred = super().batching_for(device, keeps_graphs)
        return "loop" if preferred == "threads" and keeps_graphs else preferred

    def __init__(self, cfg: Conv4Config, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        channels = input_shape[0]
        self.mean = cfg.readout == "mean" or (cfg.readout == "auto" and cfg.strided)
        self.blocks = nn.Sequential(
            *(
                ConvBlock(
                    channels if i == 0 else cfg.filters, cfg.filters, cfg, i < cfg.pool_blocks
                )
                for i in range(4)
            )
        )
        self.films = nn.ModuleDict()
        if cfg.context:
            self.context = nn.Parameter(torch.zeros(cfg.context), requires_grad=False)
            for block in cfg.film:
                width = 2 * cfg.filters
                layers: list[nn.Module] = [nn.Linear(cfg.context, width)]
                if cfg.film_hidden:
                    layers += [nn.ReLU(), nn.Linear(width, width)]
                self.films[str(block)] = nn.Sequential(*layers)
        try:
            with torch.no_grad():
                self.feature_dim = self.features(torch.zeros(2, *input_shape)).shape[-1]
                # the last block's feature maps [C, h, w], which ``readout: flatten`` flattens
                self.map_shape = tuple(self.blocks(torch.zeros(2, *input_shape)).shape[1:])
        except RuntimeError:
            raise ConfigError(
                f"Inputs of shape {tuple(input_shape)} are too small for conv4: "
                f"its four 2x2 poolings need images of at least 16x16. Use a "
                f"larger task.image_size or model.strided=true."
            ) from None
        self.head = nn.Linear(self.feature_dim, output_dim) if output_dim else None

    def features(self, x: Tensor) -> Tensor:  # [N, C, H, W] -> [N, D]
        if not self.films:
            x = self.blocks(x)
        blocks: list[ConvBlock] = list(self.blocks) if self.films else []  # type: ignore[arg-type]
        for i, block in enumerate(blocks, start=1):
            if str(i) in self.films:
                x = block.conditioned(x, self.films[str(i)](self.context))
            else:
                x = block(x)
        return x.mean(dim=(2, 3)) if self.mean else x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features
