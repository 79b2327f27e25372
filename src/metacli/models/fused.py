"""A Conv-4 block (convolution, batch norm on batch statistics, ReLU, 2x2 max-pooling) as
one autograd node, for the passes whose graph is backpropagated once.

Why: on a CPU the block's work on full-resolution activations, not its convolution,
dominated an Omniglot MAML task: the first block's max-pooling, batch norm, ReLU and their
backward passes took about half of it, PyTorch's NCHW max-pooling kernel most of all, far
slower than in channels-last memory (the profile: docs/benchmarks.md). Autograd also keeps
three full-size tensors per block: the convolution's output, the ReLU's output and int64
pooling indices.

As one node the block works in channels-last memory; pools before the ReLU (the same
values and winners wherever gradient passes); keeps the convolution's output (or, for
one-channel images, computes it again in the backward, which is cheap) and int32 indices
of the winners; and writes batch norm's backward in place in that output, since with the
gradient nonzero only at the winners it is an affine map of the output plus a scatter.
The task is faster and its peak memory lower (docs/benchmarks.md).

Its backward is not itself differentiable, and it reuses what it kept: backpropagating
with ``create_graph=True`` or a second time raises. So it runs only where the caller
declares that the pass's graph is backpropagated once (``backward_once``): MAML's query
pass, a first-order inner step, a pretraining batch, a ProtoNet episode, and evaluation's
query passes (no graph at all: ``conv_norm_pool``, the forward alone). Second-order inner
steps keep autograd's operations, and so does a model called outside any declaration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Inputs with this many channels or fewer (images) have their convolution computed again
# in the backward rather than its output kept: with one input channel the convolution
# costs about as much as a pass over its output
RECOMPUTE_CHANNELS = 1

# Batch statistics' temporaries (elements)
CHUNK_ELEMENTS = 2**18

SINGLE_BACKWARD = (
    "A Conv-4 pass declared to be backpropagated once (metacli.models.fused.backward_once) "
    "was backpropagated {}. Its blocks keep what one backward needs and reuse it; leave "
    "this pass out of backward_once."
)

_ONCE: ContextVar[bool] = ContextVar("metacli_backward_once", default=False)


@contextmanager
def backward_once(enabled: bool = True) -> Iterator[None]:
    """Declare that the graph of the forward passes inside is backpropagated at most once
    and never with ``create_graph``: layers may then take their single-backward forms.
    Per thread (a context variable)."""
    token = _ONCE.set(enabled)
    try:
        yield
    finally:
        _ONCE.reset(token)


def backpropagated_once() -> bool:
    return _ONCE.get()


def channels_last(t: Tensor) -> Tensor:
    """``t`` [N, C, H, W] in channels-last memory (a one-channel tensor restrided, not
    copied: PyTorch reads it as either layout and would pick the other)."""
    if t.shape[1] == 1:
        h, w = t.shape[-2:]
        return t.contiguous().as_strided(t.shape, (h * w, 1, w, 1))
    return t.contiguous(memory_format=torch.channels_last)


def batch_statistics(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``z`` [N, C, H, W] in channels-last memory,
    in two passes. (PyTorch's channels-last batch norm sums its statistics in one float32
    pass: on Omniglot's first block its mean and inverse std are about 1e-4 off, and the
    meta-gradient several percent; docs/benchmarks.md.)"""
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [N * H * W, C]: a view
    mean = rows.mean(0)
    # the squares in chunks of about a megabyte: a full-size temporary is slower than
    # the whole pass (a fresh allocation's page faults)
    chunks = rows.split(max(1, CHUNK_ELEMENTS // rows.shape[1]))
    squares = sum(chunk.sub(mean).square_().sum(0) for chunk in chunks)
    return mean, squares / rows.shape[0]


def normalized(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor,
    eps: float,
    keep: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The block's convolution and batch norm, ``x`` and ``weight`` in channels-last memory
    (``channels_last``): (normalised output, the convolution's output if ``keep`` else
    None, batch mean, inverse std)."""
    z = torch.conv2d(x, weight, bias, 1, 1)  # [N, C, H, W], channels-last
    mean, var = batch_statistics(z)
    invstd = torch.rsqrt(var + eps)
    # the normalisation with these statistics: batch norm's evaluation form, elementwise
    if keep:
        y = torch.native_batch_norm(z, scale, shift, mean, var, False, 0.0, eps)[0]
        return y, z, mean, invstd
    empty = z.new_empty(0)  # (no statistics saved in the evaluation form)
    torch.ops.aten.native_batch_norm.out(  # normalised in place
        z, scale, shift, mean, var, False, 0.0, eps, out=z, save_mean=empty, save_invstd=empty
    )
    return z, None, mean, invstd


def conv_norm_pool(*block: Any) -> Tensor:
    """The block without gradients (evaluation's query passes), from ``ConvNormPool``'s
    arguments: the same layers in channels-last memory, where PyTorch's max-pooling is
    much faster."""
    x, weight, bias, scale, shift, eps, ceil = block
    x, weight = channels_last(x), channels_last(weight)
    y = normalized(x, weight, bias, scale, shift, eps, keep=False)[0]
    return F.max_pool2d(y, 2, ceil_mode=ceil).relu_()


class ConvNormPool(torch.autograd.Function):
    """conv2d(3x3, padding 1) -> batch norm (batch statistics) -> ReLU -> 2x2 max-pool."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,  # [N, C_in, H, W]
        weight: Tensor,  # [C, C_in, 3, 3]
        bias: Tensor | None,  # [C]
        scale: Tensor | None,  # [C] (None: fixed at 1)
        shift: Tensor,  # [C]
        eps: float,
        ceil: bool,
    ) -> Tensor:
        x, weight = channels_last(x), channels_last(weight)
        # one input channel: z normalised in its own storage, computed again for the backward
        recompute = x.shape[1] <= RECOMPUTE_CHANNELS
        y, z, mean, invstd = normalized(x, weight, bias, scale, shift, eps, keep=not recompute)
        # pooling before the ReLU gives the same values and winners where a window's
        # maximum is positive; elsewhere the output is 0 and no gradient passes
        pooled, won = torch.ops.aten.max_pool2d_with_indices(
            y, [2, 2], [2, 2], [0, 0], [1, 1], ceil
        )
        del y
        ctx.z = z
        ctx.won, ctx.mean, ctx.invstd = won.to(torch.int32), mean, invstd
        ctx.save_for_backward(x, weight, bias, scale, pooled.relu_())
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # grad: [N, C, h, w]
        if torch.is_grad_enabled():  # create_graph=True: a second differentiation to come
            raise RuntimeError(SINGLE_BACKWARD.format("with create_graph=True"))
        x, weight, bias, scale, pooled = ctx.saved_tensors
        z, won, mean, invstd = ctx.z, ctx.won, ctx.mean, ctx.invstd
        if won is None:
            raise RuntimeError(SINGLE_BACKWARD.format("a second time"))
        ctx.z = ctx.won = None
        if z is None:
            z = torch.conv2d(x, weight, bias, 1, 1)
        channels = z.shape[1]
        count = z.numel() // channels
        per_channel = (1, channels, 1, 1)
        grad = channels_last(grad) * pooled.sign()  # ReLU's gate (pooled >= 0)
        won = won.flatten(2).long()  # [N, C, h * w]: flat positions in [H * W]
        centred = z.flatten(2).gather(2, won) - mean.view(1, channels, 1)  # at the winners
        d_shift = grad.sum((0, 2, 3))
        d_scale = invstd * (grad.flatten(2) * centred).sum((0, 2))  # sum of grad * zhat
        a = invstd if scale is None else scale * invstd
        # batch norm's backward: a * (grad - mean(grad) - zhat * mean(grad * zhat)), with
        # grad nonzero at the winners only, is b * z + c everywhere plus a * grad there
        b = -a * invstd * d_scale / count
        c = -a * d_shift / count - b * mean
        dz = z.mul_(b.view(per_channel)).add_(c.view(per_channel))  # in z's storage
        dz.flatten(2).scatter_add_(  # (a view: [N, C, H * W] of channels-last memory)
            2, won, (grad * a.view(per_channel)).flatten(2)
        )
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            dz,
            x,
            weight,
            None if bias is None else [weight.shape[0]],
            [1, 1],
            [1, 1],
            [1, 1],
            False,
            [0, 0],
            1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None],
        )
        return (
            dx,
            dweight,
            dbias,
            None if scale is None else d_scale,
            d_shift,
            None,
            None,
        )
