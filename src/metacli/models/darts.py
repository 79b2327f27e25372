"""A DARTS search network (Liu et al. 2019) for architecture search in meta-learning.

A stem (3x3 convolution and batch norm, ``stem_multiplier`` x ``channels`` maps), then
``cells`` cells, those listed in ``reductions`` halving the resolution and doubling the
channels, then global average pooling and a linear ``head``. A cell has two inputs (the
two previous cells' outputs, each brought to C channels) and ``nodes`` intermediate nodes;
node i sums one *edge* from each earlier state (the two inputs and nodes 0..i-1), and the
cell outputs its nodes concatenated. Every edge is a mixed operation: the weighted sum of
the operations in ``ops`` with weights softmax(alpha_e / T), one row of the architecture
weights ``alpha_normal`` or ``alpha_reduce`` [edges, ops] per edge, shared by every cell of
that type, as in DARTS and MetaNAS (boschresearch/metanas, models/search_cnn.py).

The architecture weights are ordinary parameters, so ``torch.func`` calls the network with
per-task alphas like any other weight (MetaNAS adapts them in the inner loop) and batch norm
is computed from plain statistics (``MetaBatchNorm``; without affine parameters inside the
operations, as DARTS). With ``sampling: gumbel`` every task draws a discrete architecture:
weights onehot(argmax((alpha + G) / T)) with the straight-through gradient of the softmax,
G the task's Gumbel noise, given in the parameters as ``gumbel_normal``/``gumbel_reduce``
(``draw``). The temperature T is a buffer, so an algorithm can anneal it (and a resume
restores it). ``genotype()`` discretises: per node, the best operation of each incoming edge
(``zero`` excluded), and the ``keep`` strongest edges (the DARTS rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metacli.config import MAX_LAYERS, require
from metacli.errors import ConfigError
from metacli.models.base import MetaBatchNorm, Model, ModelConfig
from metacli.models.operations import (
    CONV_3X3,
    OPS,
    Cell,
    Genotype,
    edge_count,
    input_pairs,
    pair_count,
)
from metacli.streams import TaskRandom

DARTS_OPS = [
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "zero",
]
SAMPLING = ("none", "gumbel")
KINDS = ("normal", "reduce")
MAX_NODES = 64  # a cell's intermediate nodes (DARTS: 4)


@dataclass
class DartsConfig(ModelConfig):
    name: str = "darts"
    channels: int = 16  # C of the first cells (doubled at each reduction)
    cells: int = 4
    reductions: list[int] | None = None  # cells that halve the resolution (null: n/3, 2n/3)
    nodes: int = 3  # intermediate nodes per cell
    ops: list[str] = field(default_factory=lambda: list(DARTS_OPS))
    stem_multiplier: int = 3
    stem_stride: int = 1  # 2 halves the resolution at once (4x less compute; CPU searches)
    temperature: float = 1.0  # of the softmax over each edge's operations (at the start)
    sampling: str = "none"  # none: the continuous mixture | gumbel: one architecture per task
    keep: int = 2  # incoming edges per node kept by the discretisation
    # conv_3x3: full (a plain 3x3 convolution) | separable (MetaNAS's code: its DilConv with
    # dilation 1, a depthwise 3x3 then a pointwise 1x1)
    conv_3x3: str = "full"
    # MetaNAS's pairwise input alphas (--use_pairwise_input_alphas): per node, a softmax over
    # the pairs of its inputs; the node sums each pair's two edges weighted by the pair's
    # weight, and the discretisation keeps the strongest pair
    pairwise_inputs: bool = False
    # operations (and input pairs) whose weight is at most this are left out of the forward
    # pass (MetaNAS's --alpha_prune_threshold; 0: none)
    prune_threshold: float = 0.0
    # drop-path (MetaNAS's --drop_path_prob, DARTS's): while adapting to a training task,
    # each example's output of each non-identity operation is dropped with this probability
    # (the kept ones scaled by 1 / (1 - p)); never at evaluation
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        require(self.channels >= 1, "model.channels", self.channels, "it must be >= 1")
        require(1 <= self.cells <= MAX_LAYERS, "model.cells", self.cells, f"1 to {MAX_LAYERS:,}")
        require(
            1 <= self.nodes <= MAX_NODES,
            "model.nodes",
            self.nodes,
            f"1 to {MAX_NODES} (the edges of a cell grow with its nodes squared)",
        )
        require(self.keep >= 1, "model.keep", self.keep, "it must be >= 1")
        require(self.stem_stride in (1, 2), "model.stem_stride", self.stem_stride, "1 or 2")
        require(self.temperature > 0, "model.temperature", self.temperature, "it must be > 0")
        require(
            self.sampling in SAMPLING,
            "model.sampling",
            self.sampling,
            f"choose one of {', '.join(SAMPLING)}",
        )
        unknown = [op for op in self.ops if op not in OPS]
        require(
            not unknown and len(self.ops) >= 1 and len(set(self.ops)) == len(self.ops),
            "model.ops",
            self.ops,
            f"list distinct operations among {', '.join(OPS)}",
        )
        require(
            self.ops != ["zero"], "model.ops", self.ops, "a space of `zero` alone has no network"
        )
        require(
            self.conv_3x3 in CONV_3X3,
            "model.conv_3x3",
            self.conv_3x3,
            f"choose one of {', '.join(CONV_3X3)}",
        )
        require(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "in [0, 1)")
        require(
            0.0 <= self.prune_threshold < 1.0,
            "model.prune_threshold",
            self.prune_threshold,
            "a weight in [0, 1)",
        )
        reductions = self.reductions or []
        require(
            all(0 <= r < self.cells for r in reductions),
            "model.reductions",
            self.reductions,
            f"cell indices in [0, {self.cells - 1}]",
        )

    def reduction_cells(self) -> list[int]:
        if self.reductions is None:
            return sorted({self.cells // 3, 2 * self.cells // 3})
        return sorted(set(self.reductions))


def macro(
    cfg: Any, channels_in: int, reductions: list[int], genes: dict[str, Genotype] | None
) -> tuple[nn.Module, nn.ModuleList, int]:
    """The stem and the cells (search cells without ``genes``, derived cells with them),
    and the channels of the last cell's output."""
    stem_channels = cfg.stem_multiplier * cfg.channels
    stem = nn.Sequential(
        nn.Conv2d(channels_in, stem_channels, 3, cfg.stem_stride, padding=1, bias=False),
        MetaBatchNorm(stem_channels),
    )
    cells = nn.ModuleList()
    c_pp, c_p, c = stem_channels, stem_channels, cfg.channels
    reduction_prev = False
    for i in range(cfg.cells):
        reduction = i in reductions
        c = c * 2 if reduction else c
        kind = "reduce" if reduction else "normal"
        gene = None if genes is None else genes[kind]
        affine = getattr(cfg, "affine", False)
        conv_3x3 = getattr(cfg, "conv_3x3", "full")
        cell = Cell(
            c_pp, c_p, c, reduction_prev, reduction, cfg.nodes, cfg.ops, gene, affine, conv_3x3
        )
        cells.append(cell)
        reduction_prev = reduction
        c_pp, c_p = c_p, c * cell.outputs
    return stem, cells, c_p


class Darts(Model, key="darts"):
    inputs = "images"
    Config = DartsConfig
    # Like Conv-4: batched (grouped) convolutions lose to a loop of tasks on a CPU.
    preferred_batching = {"cpu": "threads", "cuda": "vmap"}
    temperature: Tensor
    pair_incidence: Tensor  # model.pairwise_inputs: [edges, pairs]
    drop_keep: Tensor  # drop-path's factors [cells, edges, ops, N] while given (``drop_masks``)

    def __init__(self, cfg: DartsConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        self.cfg: DartsConfig = cfg
        self.stochastic = cfg.sampling == "gumbel"
        self.reductions = cfg.reduction_cells()
        self.stem, self.cells, features = macro(cfg, input_shape[0], self.reductions, None)
        edges = edge_count(cfg.nodes)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(edges, len(cfg.ops)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(cfg.ops)))
        if cfg.pairwise_inputs:
            self.alpha_pw_normal = nn.Parameter(1e-3 * torch.randn(pair_count(cfg.nodes)))
            self.alpha_pw_reduce = nn.Parameter(1e-3 * torch.randn(pair_count(cfg.nodes)))
            self.register_buffer("pair_incidence", incidence(cfg.nodes), persistent=False)
        self.register_buffer("temperature", torch.tensor(float(cfg.temperature)))
        # empty: no drop-path; a task's masks are given in its place (``drop_masks``)
        self.register_buffer("drop_keep", torch.zeros(0), persistent=False)
        self.feature_dim = features
        self.head = nn.Linear(features, output_dim) if output_dim else None
        if self.stochastic:  # replaced by each task's draw (``draw``), zero otherwise
            self.register_buffer("gumbel_normal", torch.zeros(edges, len(cfg.ops)))
            self.register_buffer("gumbel_reduce", torch.zeros(edges, len(cfg.ops)))

    def architecture_names(self) -> list[str]:
        pairwise = [f"alpha_pw_{kind}" for kind in KINDS] if self.cfg.pairwise_inputs else []
        return ["alpha_normal", "alpha_reduce", *pairwise]

    def draw(self, rng: TaskRandom) -> dict[str, Tensor]:
        """This task's Gumbel noise for every edge of both cell types (``sampling: gumbel``)."""
        if not self.stochastic:
            return {}
        shape = tuple(self.alpha_normal.shape)
        dtype = self.alpha_normal.dtype
        return {
            "gumbel_normal": rng.gumbel(shape, dtype),
            "gumbel_reduce": rng.gumbel(shape, dtype),
        }

    def draw_names(self) -> list[str]:
        return [f"gumbel_{kind}" for kind in KINDS] if self.stochastic else []

    def edge_weights(self, alpha: Tensor, noise: Tensor | None = None) -> Tensor:
        """[edges, ops]: softmax(alpha / T), or the straight-through one-hot of a draw."""
        if noise is None:
            return self.pruned(torch.softmax(alpha / self.temperature, dim=-1))
        soft = torch.softmax((alpha + noise) / self.temperature, dim=-1)
        index = torch.arange(soft.shape[-1], device=soft.device)
        hard = (index == soft.argmax(-1, keepdim=True)).to(soft.dtype)
        return hard + (soft - soft.detach())

    def drop_masks(self, rng: TaskRandom, examples: int, dtype: torch.dtype) -> Tensor:
        """One pass's drop-path factors from the task's stream: [cells, edges, ops,
        examples], 0 (dropped) or 1 / (1 - p)."""
        p = self.cfg.drop_path
        shape = (len(self.cells), edge_count(self.cfg.nodes), len(self.cfg.ops), examples)
        return (rng.uniform(shape, dtype) >= p).to(dtype) / (1.0 - p)

    def pruned(self, weights: Tensor) -> Tensor:
        """Weights at most ``prune_threshold`` set to 0: their operation (or input pair)
        takes no part, as MetaNAS's code leaves it out (the same values)."""
        threshold = self.cfg.prune_threshold
        return weights * (weights > threshold) if threshold > 0 else weights

    def input_weights(self, alpha_pw: Tensor) -> Tensor:
        """[edges]: each edge's factor in its node's sum, the summed weights of the input
        pairs it belongs to, the weights a softmax over each node's pairs (at the
        temperature, pruned)."""
        pieces, start = [], 0
        for node in range(self.cfg.nodes):
            count = len(input_pairs(node))
            piece = torch.softmax(alpha_pw[start : start + count] / self.temperature, dim=-1)
            pieces.append(self.pruned(piece))
            start += count
        return self.pair_incidence.to(alpha_pw.dtype) @ torch.cat(pieces)

    def features(self, x: Tensor) -> Tensor:
        noise = {k: getattr(self, f"gumbel_{k}") if self.stochastic else None for k in KINDS}
        weights = {k: self.edge_weights(getattr(self, f"alpha_{k}"), noise[k]) for k in KINDS}
        inputs = {
            k: self.input_weights(getattr(self, f"alpha_pw_{k}"))
            if self.cfg.pairwise_inputs
            else None
            for k in KINDS
        }
        drops = self.drop_keep if self.drop_keep.dim() == 4 else None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            kind = "reduce" if i in self.reductions else "normal"
            drop = None if drops is None else drops[i]
            s0, s1 = s1, cell(s0, s1, weights[kind], inputs[kind], drop)
        return s1.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features

    def genotype(self, alphas: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The discrete architecture (DARTS rule) of the given or the meta-learned alphas,
        with the macro settings that rebuild it (``model=genotype``)."""
        alphas = alphas or {n: p.detach() for n, p in self.named_parameters() if "alpha" in n}
        cfg = self.cfg
        out: dict[str, Any] = {}
        for kind in KINDS:
            weights = torch.softmax(alphas[f"alpha_{kind}"].float() / self.temperature.float(), -1)
            pairs = alphas.get(f"alpha_pw_{kind}") if cfg.pairwise_inputs else None
            out[kind] = discretize(weights, cfg.ops, cfg.nodes, cfg.keep, pairs)
        return {
            **out,
            "nodes": cfg.nodes,
            "channels": cfg.channels,
            "cells": cfg.cells,
            "reductions": self.reductions,
            "stem_multiplier": cfg.stem_multiplier,
            "stem_stride": cfg.stem_stride,
            "conv_3x3": cfg.conv_3x3,
        }


def incidence(nodes: int) -> Tensor:
    """[edges, pairs]: 1 where the edge (node i's input j) belongs to the pair."""
    out = torch.zeros(edge_count(nodes), pair_count(nodes))
    edge, pair = 0, 0
    for node in range(nodes):
        for a, b in input_pairs(node):
            out[edge + a, pair] = out[edge + b, pair] = 1.0
            pair += 1
        edge += node + 2
    return out


def discretize(
    weights: Tensor, ops: list[str], nodes: int, keep: int, pairs: Tensor | None = None
) -> Genotype:
    """Per node: each incoming edge's strongest operation other than ``zero``, and the
    ``keep`` edges whose chosen operation weighs most, or, with pairwise input alphas
    ``pairs``, the two inputs of the node's strongest pair (MetaNAS's parse_pairwise);
    [[op, input], ...] per node, inputs in increasing order (0, 1: the cell's inputs;
    2 + i: node i)."""
    usable = [k for k, op in enumerate(ops) if op != "zero"]
    if not usable:
        raise ConfigError("model.ops has only `zero`: there is nothing to keep.")
    genes, start = [], 0
    for node in range(nodes):
        inputs = node + 2
        rows = weights[start : start + inputs][:, usable]  # [inputs, usable ops]
        best, which = rows.max(dim=-1)
        order = sorted(range(inputs), key=lambda j: (-float(best[j]), j))[: min(keep, inputs)]
        if pairs is not None:
            first = sum(len(input_pairs(i)) for i in range(node))
            candidates = input_pairs(node)
            order = list(candidates[int(pairs[first : first + len(candidates)].argmax())])
        genes.append([[ops[usable[int(which[j])]], j] for j in sorted(order)])
        start += inputs
    return genes
