"""The operations and the cell of DARTS-style networks (the search network ``darts`` and
the derived network ``genotype``), as in DARTS and MetaNAS's ``ops.py``.

Each convolutional operation is ReLU - convolution(s) - batch norm (``MetaBatchNorm``,
plain statistics, so exact under ``vmap``); pooling is followed by batch norm; ``skip_connect``
is the identity, or a factorized reduction (two offset 1x1 convolutions of stride 2) where
the edge halves the resolution; ``zero`` multiplies by 0. Search cells use them without
affine parameters (DARTS); derived cells with them by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.models.base import MetaBatchNorm

Genotype = list[list[list[object]]]  # per node: [[operation, input], ...]


def edge_count(nodes: int) -> int:
    """Edges of a cell: node i has one from each of its i + 2 predecessors."""
    return sum(i + 2 for i in range(nodes))


def input_pairs(node: int) -> list[tuple[int, int]]:
    """The pairs of node ``node``'s inputs (a < b), in MetaNAS's order."""
    return [(a, b) for a in range(node + 2) for b in range(a + 1, node + 2)]


def pair_count(nodes: int) -> int:
    return sum(len(input_pairs(i)) for i in range(nodes))


class ReLUConvBN(nn.Module):
    """ReLU - convolution (optionally dilated or depthwise-separable) - batch norm."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        stride: int,
        padding: int | tuple[int, int],
        affine: bool,
        dilation: int = 1,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if separable:  # depthwise then pointwise
            self.convs = nn.ModuleList(
                [
                    nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation, c_in, bias=False),
                    nn.Conv2d(c_in, c_out, 1, bias=False),
                ]
            )
        else:
            self.convs = nn.ModuleList(
                [nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False)]
            )
        self.norm = MetaBatchNorm(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        for conv in self.convs:
            x = conv(x)
        return self.norm(x)


class Factorized(nn.Module):
    """ReLU - 1x1 convolution (and 1x5 then 5x1) - batch norm, as MetaNAS's ``FacConv``."""

    def __init__(self, c: int, length: int, stride: int, affine: bool) -> None:
        super().__init__()
        pad = length // 2
        self.row = nn.Conv2d(c, c, (1, length), stride, (0, pad), bias=False)
        self.column = nn.Conv2d(c, c, (length, 1), 1, (pad, 0), bias=False)
        self.norm = MetaBatchNorm(c, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.column(self.row(F.relu(x))))


class Pool(nn.Module):
    def __init__(self, kind: str, c: int, stride: int, affine: bool) -> None:
        super().__init__()
        self.kind, self.stride = kind, stride
        self.norm = MetaBatchNorm(c, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            x = F.max_pool2d(x, 3, self.stride, 1)
        else:
            x = F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)
        return self.norm(x)


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Zero(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing every other pixel: two 1x1 convolutions of
    stride 2, the second offset by one pixel, concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool) -> None:
        super().__init__()
        self.first = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.second = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.norm = MetaBatchNorm(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        shifted = x[:, :, 1:, 1:] if x.shape[2] % 2 == 0 else x
        return self.norm(torch.cat([self.first(x), self.second(shifted)], dim=1))


def _sep(c: int, k: int, s: int, affine: bool) -> nn.Module:
    """DARTS's separable convolution: the depthwise-separable block twice."""
    return nn.Sequential(
        ReLUConvBN(c, c, k, s, k // 2, affine, separable=True),
        ReLUConvBN(c, c, k, 1, k // 2, affine, separable=True),
    )


Builder = Callable[[int, int, bool], nn.Module]  # (channels, stride, affine) -> operation
OPS: dict[str, Builder] = {
    "zero": lambda c, s, a: Zero(s),
    "skip_connect": lambda c, s, a: Identity() if s == 1 else FactorizedReduce(c, c, a),
    "max_pool_3x3": lambda c, s, a: Pool("max", c, s, a),
    "avg_pool_3x3": lambda c, s, a: Pool("avg", c, s, a),
    "conv_3x3": lambda c, s, a: ReLUConvBN(c, c, 3, s, 1, a),
    "conv_1x5_5x1": lambda c, s, a: Factorized(c, 5, s, a),
    "sep_conv_3x3": lambda c, s, a: _sep(c, 3, s, a),
    "sep_conv_5x5": lambda c, s, a: _sep(c, 5, s, a),
    "dil_conv_3x3": lambda c, s, a: ReLUConvBN(c, c, 3, s, 2, a, dilation=2, separable=True),
    "dil_conv_5x5": lambda c, s, a: ReLUConvBN(c, c, 5, s, 4, a, dilation=2, separable=True),
}


# ``conv_3x3`` as MetaNAS's code builds it (ops.py: ``DilConv`` with dilation 1): ReLU -
# depthwise 3x3 - pointwise 1x1 - batch norm (``model.conv_3x3=separable``)
SEPARABLE_CONV_3X3: Builder = lambda c, s, a: ReLUConvBN(c, c, 3, s, 1, a, separable=True)  # noqa: E731
CONV_3X3 = ("full", "separable")


def operation(name: str, c: int, stride: int, affine: bool, conv_3x3: str = "full") -> nn.Module:
    if name == "conv_3x3" and conv_3x3 == "separable":
        return SEPARABLE_CONV_3X3(c, stride, affine)
    return OPS[name](c, stride, affine)


class Edge(nn.Module):
    """One edge: the weighted sum of its operations (one operation: that operation)."""

    def __init__(
        self, names: list[str], c: int, stride: int, affine: bool, conv_3x3: str = "full"
    ) -> None:
        super().__init__()
        self.names = names
        self.ops = nn.ModuleList([operation(n, c, stride, affine, conv_3x3) for n in names])

    def forward(self, x: Tensor, weights: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """``weights`` [ops]; ``drop`` [ops, N]: each example's factor on each operation's
        output (drop-path: 0 or 1 / keep), the identity left whole, as MetaNAS's MixedOp."""
        if weights is None:
            return self.ops[0](x)
        out: Tensor | None = None
        for k, op in enumerate(self.ops):
            value = op(x)
            if drop is not None and not isinstance(op, Identity):
                value = value * drop[k].view(-1, *([1] * (value.dim() - 1)))
            out = weights[k] * value if out is None else out + weights[k] * value
        assert out is not None
        return out


class Cell(nn.Module):
    """A search cell (``gene`` None: every edge a mixed operation over ``ops``) or a derived
    one (``gene``: per node, the kept [operation, input] pairs)."""

    def __init__(
        self,
        c_pp: int,
        c_p: int,
        c: int,
        reduction_prev: bool,
        reduction: bool,
        nodes: int,
        ops: list[str],
        gene: Genotype | None,
        affine: bool,
        conv_3x3: str = "full",
    ) -> None:
        super().__init__()
        if reduction_prev:
            self.pre0: nn.Module = FactorizedReduce(c_pp, c, affine)
        else:
            self.pre0 = ReLUConvBN(c_pp, c, 1, 1, 0, affine)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0, affine)
        self.search = gene is None
        self.inputs: list[list[int]] = []  # per node, the states its edges read
        self.edges = nn.ModuleList()
        for node in range(nodes):
            if gene is None:
                pairs: list[tuple[list[str], int]] = [(ops, j) for j in range(node + 2)]
            else:
                pairs = [([str(op)], int(str(j))) for op, j in gene[node]]
            self.inputs.append([j for _, j in pairs])
            for names, j in pairs:
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(Edge(list(names), c, stride, affine, conv_3x3))
        self.outputs = nodes  # the cell concatenates its intermediate nodes

    def forward(
        self,
        s0: Tensor,
        s1: Tensor,
        weights: Tensor | None = None,
        factors: Tensor | None = None,
        drops: Tensor | None = None,
    ) -> Tensor:
        """``weights`` [search edges, ops] for a search cell; ``factors`` [search edges]: each
        edge's factor in its node's sum (MetaNAS's pairwise input alphas), or None: 1;
        ``drops`` [search edges, ops, N]: drop-path's factors (``Edge``), or None."""
        states = [self.pre0(s0), self.pre1(s1)]
        index = 0
        for inputs in self.inputs:
            total: Tensor | None = None
            for j in inputs:
                edge_weights = weights[index] if self.search and weights is not None else None
                drop = drops[index] if self.search and drops is not None else None
                value = self.edges[index](states[j], edge_weights, drop)
                if self.search and factors is not None:
                    value = factors[index] * value
                total = value if total is None else total + value
                index += 1
            assert total is not None
            states.append(total)
        return torch.cat(states[2:], dim=1)
