"""Shared base of the models: a registered nn.Module sized by the task, and batch norm
written so that it stays exact under ``torch.func`` transforms."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.errors import ConfigError
from metacli.registry import Registered
from metacli.streams import TaskRandom

NORMS = ("transductive", "per_step", "running", "none")
# d loss / d output [N, out] and the names asked -> d loss / d params[name] for each
Backward = Callable[[Tensor, Collection[str]], dict[str, Tensor]]


class StackedPass(Protocol):
    """One forward pass on a stack of tasks [T, N, ...] (weights shared, or one per task
    [T, ...]) and its backward passes written out (``MLPPass``), for the meta-gradient
    computed by hand (``metacli.engine.stacked_meta_gradient``)."""

    output: Tensor  # [T, N, out]

    def backward(self, grad: Tensor, names: Collection[str]) -> dict[str, Tensor]:
        """Per-task d loss / d params[name] from d loss / d output."""
        ...

    def tangent(self, direction: dict[str, Tensor]) -> Tensor:
        """The output's derivative along a direction in weight space."""
        ...

    def tangent_backward(
        self, grad: Tensor, r_grad: Tensor, direction: dict[str, Tensor], names: Collection[str]
    ) -> dict[str, Tensor]:
        """The derivative along that direction of ``backward(grad, names)``, given the
        derivative ``r_grad`` of ``grad``."""
        ...


@dataclass
class ModelConfig:
    name: str = ""


class Model(nn.Module, Registered):
    """Algorithms call models through ``torch.func.functional_call`` with per-task weights.

    ``output_dim=None`` builds the embedding network alone (metric-based algorithms);
    otherwise the last layer is a linear ``head`` (the part ANIL adapts).
    """

    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # How a meta-batch is best computed on this model when algo.batching=auto; measured
    # by `make bench` (docs/benchmarks.md): vmap wins big for small MLPs on a CPU, while
    # batched (grouped) convolutions lose to a loop there.
    preferred_batching: ClassVar[dict[str, str]] = {"cpu": "vmap", "cuda": "vmap"}
    # True: each task draws (``draw``, from its rng) tensors its forward pass reads
    stochastic: bool = False
    # The inputs it takes: "images" [C, H, W] (convolutions) or "any" shape (flattened).
    inputs: ClassVar[str] = "any"

    def carried(self) -> dict[str, str]:
        """Files the run folder keeps so that the run can be resumed and tested without
        the files its settings name (``model=genotype``'s genotype.json): name -> text."""
        return {}

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__()
        self.cfg = cfg
        if self.inputs == "images" and len(input_shape) != 3:
            raise ConfigError(
                f"model={cfg.name} takes images [channels, height, width], but the task's "
                f"inputs have shape {tuple(input_shape)}. Choose model=mlp for this task, or "
                f"an image task (task=omniglot, miniimagenet, image_folder, synthetic)."
            )

    def draw(self, rng: TaskRandom) -> dict[str, Tensor]:
        """A task's draws, by the names of the buffers they replace (``stochastic`` models)."""
        return {}

    def functional(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
    ) -> Tensor:
        """The forward pass with the given weights and buffers. ``functional_call`` swaps
        them into the module and back, in Python: more than the whole forward pass of a
        small MLP, so such models override this with the computation written out."""
        return torch.func.functional_call(self, (params, buffers), (x,))

    def functional_backward(
        self, params: dict[str, Tensor], x: Tensor
    ) -> tuple[Tensor, Backward] | None:
        """The forward pass (no buffers) and its backward pass written out in plain tensor
        operations, for the inner loop's gradient: autograd's graph of a small network
        costs more than its arithmetic, under ``vmap`` most of all. ``backward(grad,
        names)`` maps d loss / d output to d loss / d params[name] for the names asked; it
        is differentiable, so second-order meta-gradients flow through it. None: not
        written out for this model (or this configuration); autograd computes them."""
        return None

    def has_stacked_pass(self) -> bool:
        """Whether ``stacked_pass`` is written out (in this configuration)."""
        return False

    def stacked_pass(self, params: dict[str, Tensor], x: Tensor) -> StackedPass | None:
        """The written pass on a stack of tasks ``x`` [T, N, *input_shape]; None: not
        written out for this model (the meta-gradient then comes from autograd)."""
        return None

    def few_threads(self) -> bool:
        """Whether this network's steps are so small that one CPU thread runs them fastest
        (the default ``threads``: ``metacli.machine``)."""
        return False

    def batching_for(self, device: torch.device, keeps_graphs: bool = True) -> str:
        """``auto``'s strategy on this device; ``keeps_graphs``: whether each task holds
        an autograd graph until its backward (``MetaAlgorithm.keeps_graphs``)."""
        return self.preferred_batching.get(device.type, "vmap")

    def norm_layers(self) -> list[MetaBatchNorm]:
        if "_norm_layers" not in self.__dict__:  # the structure is fixed once built
            self.__dict__["_norm_layers"] = [
                m for m in self.modules() if isinstance(m, MetaBatchNorm)
            ]
        return self.__dict__["_norm_layers"]

    def norm_names(self) -> list[str]:
        """The names of the batch-norm layers' parameters (``algo.adapt_norm``)."""
        return [
            f"{module_name}.{param_name}"
            for module_name, module in self.named_modules()
            if isinstance(module, MetaBatchNorm)
            for param_name, _ in module.named_parameters(recurse=False)
        ]

    def named_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Copies of the name -> parameter and name -> buffer dicts.

        Kept between calls: walking the modules costs more than a small model's forward
        pass, and a meta-iteration asks several times. Moving the model (``.to``,
        ``.double``: ``_apply``) forgets them.
        """
        cached = self.__dict__.get("_named_tensors")
        if cached is None:
            cached = (dict(self.named_parameters()), dict(self.named_buffers()))
            self.__dict__["_named_tensors"] = cached
        return dict(cached[0]), dict(cached[1])

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Model:
        self.__dict__.pop("_named_tensors", None)
        return super()._apply(fn, recurse)

    def squared_path_norm(self, params: dict[str, Tensor]) -> Tensor:
        """Sum over input-output paths of the product of squared weights (``path``
        regularizer); defined here for chains of linear layers."""
        raise ConfigError(
            f"algo.regularizer=path is defined for fully connected networks (model=mlp); "
            f"model={self.cfg.name} has other layers. Use algo.regularizer=l2 or none."
        )

    def set_step(self, step: int) -> None:
        """Tell per-step batch norm which inner step the next forward pass belongs to."""
        for layer in self.norm_layers():
            layer.step = step

    @property
    def tracks_running_stats(self) -> bool:
        return any(layer.mode == "running" for layer in self.norm_layers())

    @torch.no_grad()
    def update_running_stats(self, inputs: Tensor) -> None:
        """Accumulate running statistics from the inputs of each task ([B, N, ...])."""
        layers = self.norm_layers()
        for layer in layers:
            layer.collect = True
        try:
            for task_inputs in inputs:
                self(task_inputs)
        finally:
            for layer in layers:
                layer.collect = False


def fused_is_exact(x: Tensor) -> bool:
    """Whether PyTorch's fused batch norm may normalise ``x`` with its batch statistics.

    Under ``vmap`` its second-order meta-gradient is silently wrong (an open functorch
    issue; docs/batchnorm.md), so inside any ``torch.func`` transform, and in code being
    compiled, the statistics come from plain tensor operations. Outside them (a per-task
    loop or its threads) the fused kernel gives the same numbers and meta-gradients
    (tested against the plain form in float64), faster (README, Speed). A single value
    per channel is left to the plain form, which normalises it to zero where the fused
    kernel refuses it.
    """
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return x.numel() // x.shape[1] > 1


class MetaBatchNorm(nn.Module):
    """Batch norm over (N, H, W) with batch statistics (or running ones, see modes).

    PyTorch's own batch norm gives a silently wrong second-order meta-gradient under
    ``vmap``; there (``fused_is_exact``) the statistics come from plain mean and variance,
    which are exact; elsewhere the fused kernel computes the same, faster. Modes:
    ``transductive`` batch statistics at train and test (MAML's original);
    ``per_step`` batch statistics, with separate affine parameters for each inner step
    (MAML++), chosen by ``step``; steps past the last set reuse it;
    ``running`` batch statistics while meta-training, running statistics at
    validation/test, accumulated from the training tasks' inputs at the meta-parameters;
    ``none`` the identity.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        channels: int,
        mode: str = "transductive",
        steps: int = 1,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        scale: bool = True,
    ) -> None:
        super().__init__()
        self.mode, self.momentum, self.eps, self.affine = mode, momentum, eps, affine
        self.scale = affine and scale  # False: a learned bias only (MAML's TF batch_norm)
        self.step, self.collect = 0, False
        shape = (steps, channels) if mode == "per_step" else (channels,)
        if mode != "none":
            if affine:  # without: plain normalisation (DARTS's operations)
                if self.scale:
                    self.weight = nn.Parameter(torch.ones(shape))
                self.bias = nn.Parameter(torch.zeros(shape))
            self.register_buffer("running_mean", torch.zeros(shape))
            self.register_buffer("running_var", torch.ones(shape))

    def selected(self, tensor: Tensor) -> Tensor:
        """The affine parameter (or running statistic) of the current step."""
        if self.mode == "per_step":
            return tensor[min(self.step, tensor.shape[0] - 1)]
        return tensor

    def batch_statistics(self) -> bool:
        """Whether the next forward pass normalises with its own batch's statistics (and
        collects nothing)."""
        if self.mode == "none" or self.collect:
            return False
        return self.mode != "running" or self.training

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W] or [N, C]
        if self.mode == "none":
            return x
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        running = self.mode == "running" and not self.training and not self.collect
        if self.batch_statistics() and fused_is_exact(x):
            weight = self.selected(self.weight) if self.scale else None
            bias = self.selected(self.bias) if self.affine else None
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if running:
            mean, var = self.running_mean, self.running_var
        else:
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            if self.collect:  # outside any transform, under no_grad
                for buffer, value in ((self.running_mean, mean), (self.running_var, var)):
                    self.selected(buffer).mul_(1 - self.momentum).add_(self.momentum * value)
        scale = torch.rsqrt(var + self.eps)
        if not self.affine:
            return (x - mean.view(shape)) * scale.view(shape)
        if self.scale:
            scale = scale * self.selected(self.weight)
        return (x - mean.view(shape)) * scale.view(shape) + self.selected(self.bias).view(shape)
