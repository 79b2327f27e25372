"""Fully connected network (1-40-40-1 with ReLU on sinusoid, as in MAML)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.config import MAX_LAYERS, require
from metacli.models.base import NORMS, Backward, MetaBatchNorm, Model, ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
INITS = ("torch", "glorot", "truncated_normal")
SMALL = 100_000  # parameters up to which one thread is fastest (docs/threads.md)


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    # torch: nn.Linear's default (Kaiming-uniform weights, uniform biases); glorot:
    # Glorot-uniform weights and zero biases, Keras' Dense default (Yin et al.'s notebook);
    # truncated_normal: weights N(0, init_std^2) cut at 2 std, zero biases (cbfinn/maml's
    # construct_fc_weights, std 0.01).
    init: str = "torch"
    init_std: float = 0.01
    # true: the inner loop's gradients come from the backward pass written out below
    # (faster, the same numbers to rounding: docs/versus.md); false: from autograd
    written_backward: bool = True
    # context parameters concatenated to the input (CAVIA, algo=cavia): zeros, never
    # meta-learned, adapted per task by an inner loop that selects them (algo.adapt)
    context: int = 0
    # batch norm after each hidden layer's linear map, before the activation (MAML's
    # fully connected Omniglot network, learn2learn's OmniglotFC): the modes of conv4's
    # model.norm; none leaves the layers plain
    norm: str = "none"
    norm_eps: float = 1e-5  # 1e-3: TF's batch_norm default, which MAML and OmniglotFC use

    def __post_init__(self) -> None:
        require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            self.hidden,
            "every layer width must be >= 1",
        )
        require(
            len(self.hidden) <= MAX_LAYERS,
            "model.hidden",
            self.hidden,
            f"at most {MAX_LAYERS:,} hidden layers",
        )
        require(
            self.activation in ACTIVATIONS,
            "model.activation",
            self.activation,
            f"choose one of {', '.join(ACTIVATIONS)}",
        )
        require(self.init in INITS, "model.init", self.init, f"choose one of {', '.join(INITS)}")
        require(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        require(self.context >= 0, "model.context", self.context, "it must be >= 0")
        modes = [m for m in NORMS if m != "per_step"]
        require(self.norm in modes, "model.norm", self.norm, f"choose one of {', '.join(modes)}")
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "it must be > 0")


class MLP(Model, key="mlp"):
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        self.input_shape = tuple(input_shape)
        self.context_size = cfg.context
        widths = [math.prod(input_shape) + cfg.context, *cfg.hidden]
        self.in_dim = widths[0]
        # with a context the forward pass flattens the inputs itself, to append it
        layers: list[nn.Module] = [nn.Flatten(start_dim=-1 if cfg.context else -len(input_shape))]
        for width_in, width_out in itertools.pairwise(widths):
            layers.append(nn.Linear(width_in, width_out))
            if cfg.norm != "none":
                layers.append(MetaBatchNorm(width_out, cfg.norm, eps=cfg.norm_eps))
            layers.append(ACTIVATIONS[cfg.activation]())
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], output_dim) if output_dim else None
        self.feature_dim = widths[-1]
        for layer in self.modules():
            if isinstance(layer, nn.Linear) and cfg.init != "torch":
                if cfg.init == "glorot":
                    nn.init.xavier_uniform_(layer.weight)
                else:
                    std = cfg.init_std
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(layer.bias)
        if cfg.context:
            self.context = nn.Parameter(torch.zeros(cfg.context), requires_grad=False)

    def few_threads(self) -> bool:
        return sum(p.numel() for p in self.parameters()) <= SMALL

    def layers(self) -> list[tuple[str, str]]:
        """(weight, bias) names of the linear layers in order; the body's are followed by
        the activation, the head's is not."""
        layers = self.__dict__.get("_layers")
        if layers is None:  # the structure is fixed once built
            names = [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]
            layers = self.__dict__["_layers"] = [(f"{n}.weight", f"{n}.bias") for n in names]
        return layers

    def plain(self) -> bool:
        """Whether this network is the MLP that ``MLPPass`` writes out: MLP's forward over
        linear layers and activations alone. A subclass that changes either (another
        forward, other layers) runs through autograd and ``functional_call``."""
        plain = self.__dict__.get("_plain")
        if plain is None:  # the structure is fixed once built
            kinds = (nn.Flatten, nn.Linear, *ACTIVATIONS.values())
            plain = self.__dict__["_plain"] = (
                type(self).forward is MLP.forward
                and not self.context_size
                and all(isinstance(m, kinds) for m in self.body)
            )
        return bool(plain)

    def functional(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
    ) -> Tensor:
        """The forward pass written out (faster than functional_call; docs/benchmarks.md)."""
        if not self.plain():
            return super().functional(params, buffers, x)
        return MLPPass(self, params, x).output

    def functional_backward(
        self, params: dict[str, Tensor], x: Tensor
    ) -> tuple[Tensor, Backward] | None:
        """The forward pass keeping each layer's input and activation, and the backward
        pass of the linear layers and the activation by hand (``MLPPass``)."""
        written = self.written_pass(params, x, 1)
        return None if written is None else (written.output, written.backward)

    def has_stacked_pass(self) -> bool:
        return bool(self.cfg.written_backward) and self.plain()  # type: ignore[attr-defined]

    def stacked_pass(self, params: dict[str, Tensor], x: Tensor) -> MLPPass | None:
        return self.written_pass(params, x, 2)

    def written_pass(self, params: dict[str, Tensor], x: Tensor, dims: int) -> MLPPass | None:
        """The written pass on examples in ``dims`` leading dimensions ([N, ...] for one
        task, [T, N, ...] for a stack of tasks); None where ``model.written_backward`` is off
        or the examples are laid out otherwise."""
        written = self.cfg.written_backward and self.plain()  # type: ignore[attr-defined]
        if not written or x.dim() != len(self.input_shape) + dims:
            return None
        return MLPPass(self, params, x)

    def squared_path_norm(self, params: dict[str, Tensor]) -> Tensor:
        # Every weight and bias squared, no activation, on an all-ones input (Path-SGD):
        # each unit then holds the sum over the paths that reach it.
        units = next(iter(params.values())).new_ones(self.in_dim)
        for name, layer in self.named_modules():
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
                units = weight.pow(2) @ units + bias.pow(2)
        return units.sum()

    def forward(self, x: Tensor) -> Tensor:  # [N, *input_shape] -> [N, output_dim]
        if self.context_size:
            x = x.flatten(start_dim=x.dim() - len(self.input_shape))
            x = torch.cat([x, self.context.expand(*x.shape[:-1], -1)], dim=-1)
        features = self.body(x)
        return self.head(features) if self.head is not None else features


def linear(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``h`` [..., N, in] through a weight shared by every task [out, in] or one per task
    [T, out, in], with a bias [out] or [T, out] (adapted weights on a stack of tasks)."""
    if weight.dim() == 2 and (bias is None or bias.dim() == 1):
        return F.linear(h, weight, bias)
    if bias is None:
        return h @ weight.transpose(-1, -2)
    if weight.dim() == 3 and h.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(-2), h, weight.transpose(-1, -2))
    return h @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, as ``bmm`` where both are stacked (matmul's dispatch costs more)."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


class MLPPass:
    """One forward pass of the MLP keeping what its backward passes need, and those passes
    written out in plain tensor operations (ReLU passes the gradient where its output is
    positive, tanh multiplies it by 1 - y^2, as autograd does).

    On one task (under vmap) or on a stack of tasks [T, N, ...] whose weights are shared or
    per task [T, ...]; gradients are per task. ``backward`` gives the inner loop's gradient
    (differentiable: second-order meta-gradients may flow through it); ``tangent`` and
    ``tangent_backward`` give the directional derivatives of the output and of that
    gradient along a direction in weight space (Pearlmutter's R-operator): with the loss's
    second derivative in between, a Hessian-vector product
    (``metacli.engine.stacked_meta_gradient``).
    """

    def __init__(self, model: MLP, params: dict[str, Tensor], x: Tensor) -> None:
        self.params, self.layers = params, model.layers()
        self.relu = model.cfg.activation == "relu"  # type: ignore[attr-defined]
        self.activated = len(model.body) // 2  # the body's layers, each with its activation
        h = x.flatten(start_dim=x.dim() - len(model.input_shape))  # [..., N, in]
        self.inputs: list[Tensor] = []  # each layer's input
        self.outputs: list[Tensor] = []  # each activation's output
        for i, (weight, bias) in enumerate(self.layers):
            self.inputs.append(h)
            h = linear(h, params[weight], params[bias])
            if i < self.activated:
                h = h.relu() if self.relu else h.tanh()
                self.outputs.append(h)
        self.output = h
        # d loss / d layer i's linear output, kept by ``backward`` for the gradient it had
        self.deltas: dict[int, Tensor] = {}
        self.deltas_of: Tensor | None = None
        self.gates: dict[int, Tensor] = {}  # ReLU: 1 where the output is positive, else 0
        self.r_inputs: list[Tensor | None] = []  # tangents of each layer's input
        self.r_outputs: list[Tensor | None] = []  # and of each activation's output

    def _through(self, i: int, grad: Tensor) -> Tensor:
        """d loss / d activation output -> d loss / d layer i's linear output. (ReLU: times
        a 0/1 gate, cheaper than a select on a CPU; it differs from autograd's only where
        the gradient is not finite.)"""
        if i >= self.activated:
            return grad
        if self.relu:
            gate = self.gates.get(i)
            if gate is None:
                out = self.outputs[i]
                gate = self.gates[i] = (out > 0).to(out.dtype)
            return grad * gate
        out = self.outputs[i]
        return grad * (1 - out * out)

    def _deepest(self, names: Collection[str]) -> int | None:
        found = [i for i, (w, b) in enumerate(self.layers) if w in names or b in names]
        return min(found) if found else None

    def backward(self, grad: Tensor, names: Collection[str]) -> dict[str, Tensor]:
        """d loss / d params[name] for the names asked, from ``grad`` = d loss / d output
        [..., N, out]; back through the layers as far as the first asked."""
        deepest = self._deepest(names)
        grads: dict[str, Tensor] = {}
        self.deltas, self.deltas_of = {}, grad
        if deepest is None:
            return grads
        for i in range(len(self.layers) - 1, deepest - 1, -1):
            weight, bias = self.layers[i]
            grad = self.deltas[i] = self._through(i, grad)
            if weight in names:
                grads[weight] = product(grad.transpose(-1, -2), self.inputs[i])  # [..., out, in]
            if bias in names:
                grads[bias] = grad.sum(-2)
            if i > deepest:
                grad = product(grad, self.params[weight])  # [..., N, in]
        return grads

    def tangent(self, direction: dict[str, Tensor]) -> Tensor:
        """The output's derivative along ``direction`` (per-task tensors for some of the
        weights; the others do not move)."""
        r: Tensor | None = None  # the current layer input's tangent (None: zero)
        self.r_inputs, self.r_outputs = [], []
        for i, (weight, bias) in enumerate(self.layers):
            self.r_inputs.append(r)
            if weight in direction:
                moved = linear(self.inputs[i], direction[weight], direction.get(bias))
                r = moved if r is None else moved + linear(r, self.params[weight])
            elif r is not None:
                r = linear(r, self.params[weight], direction.get(bias))
            elif bias in direction:
                shape = (*self.inputs[i].shape[:-1], direction[bias].shape[-1])
                r = direction[bias].unsqueeze(-2).expand(shape)
            if i < self.activated:
                if r is not None:
                    r = self._through(i, r)
                self.r_outputs.append(r)
        if r is None:
            return torch.zeros_like(self.output)
        return r

    def tangent_backward(
        self, grad: Tensor, r_grad: Tensor, direction: dict[str, Tensor], names: Collection[str]
    ) -> dict[str, Tensor]:
        """The derivative along ``direction`` (after ``tangent(direction)``) of
        ``backward(grad, names)``, where ``r_grad`` is that of ``grad``."""
        deepest = self._deepest(names)
        out: dict[str, Tensor] = {}
        if deepest is None:
            return out
        known = self.deltas if grad is self.deltas_of else {}  # (backward's, for this grad)
        for i in range(len(self.layers) - 1, deepest - 1, -1):
            weight, bias = self.layers[i]
            delta = known.get(i)
            if delta is None:
                delta = self._through(i, grad)
            r_grad = self._through(i, r_grad)
            r_output = self.r_outputs[i] if i < self.activated else None
            if r_output is not None and not self.relu:  # tanh: d(1 - y^2) = -2 y dy
                r_grad = r_grad - 2 * grad * self.outputs[i] * r_output
            r_input = self.r_inputs[i]
            if weight in names:
                r_weight = product(r_grad.transpose(-1, -2), self.inputs[i])
                if r_input is not None:
                    r_weight = r_weight + product(delta.transpose(-1, -2), r_input)
                out[weight] = r_weight
            if bias in names:
                out[bias] = r_grad.sum(-2)
            if i > deepest:
                r_grad = product(r_grad, self.params[weight])
                if weight in direction:
                    r_grad = r_grad + product(delta, direction[weight])
                if not self.relu or i - 1 not in known:  # else not read
                    grad = product(delta, self.params[weight])
        return out
