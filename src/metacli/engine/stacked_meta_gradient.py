"""The meta-gradient of a gradient-descent inner loop written out, over a stack of tasks.

For the rule theta_{k+1} = theta_k - alpha * g_k, with g_k the support-loss gradient at
theta_k (k = 0..K-1) and L the query loss at theta_K, reverse mode by hand gives

    v_K = dL / dtheta_K,    v_k = v_{k+1} - H_k (alpha * v_{k+1}),    dL / dtheta = v_0,
    dL / dalpha = -sum_k g_k * v_{k+1}   (a learned alpha: Meta-SGD, learned step sizes),

where H_k u is the support loss's Hessian at theta_k times u: the model's tangent passes
(Pearlmutter's R-operator, ``MLPPass.tangent`` / ``tangent_backward``) with the loss's
second derivative between them (``StackedLoss.hessian_product``). First order drops the
H_k term. Only the adapted tensors move; a tensor that is not adapted (ANIL's body) still
gets its part of H_k u.

Every task is one row of the same tensors (weights [T, ...] once adapted), so a
meta-batch is one pass of about a hundred operations, with no autograd graph to record
and walk and no vmap: faster sinusoid iterations than vmap with the MLP's written inner
gradients (measured in docs/versus.md). The result equals autograd's to rounding
(tests/test_stacked_meta_gradient.py, float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from metacli.models.base import StackedPass
from metacli.tasks.base import StackedLoss

Pass = Callable[[dict[str, Tensor], Tensor], StackedPass | None]  # (params, x [T, N, ...])


@dataclass
class Written:
    """Each task's query loss and metric, and the meta-gradient of their mean."""

    losses: Tensor  # [T]
    metrics: Tensor  # [T]
    grads: dict[str, Tensor]  # d mean(losses) / d each initial tensor (shaped like it)
    rate_grads: dict[str, Tensor]  # d mean(losses) / d each tensor's step size alpha


def meta_gradient(
    forward: Pass,
    loss: StackedLoss,
    params: dict[str, Tensor],
    rates: dict[str, float | Tensor],
    steps: int,
    first_order: bool,
    scale: float,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
) -> Written | None:
    """``steps`` inner steps from ``params`` (shared by the tasks) on each task's support
    set, the query loss after them, and its meta-gradient; the adapted tensors are those
    with a step size in ``rates`` (a number or a tensor shaped like the parameter).
    ``scale`` multiplies the support loss (``algo.inner_loss``). None where the model or
    the loss has no written pass for these shapes (autograd's path then computes it)."""
    sx, sy = support  # [T, S, ...]
    qx, qy = query  # [T, Q, ...]
    tasks = sx.shape[0]
    names = list(params)  # (lists: the same order of operations in every process)
    adapted = [n for n in params if n in rates]
    theta = {n: p.detach() for n, p in params.items()}
    alpha = {n: r.detach() if isinstance(r, Tensor) else r for n, r in rates.items()}
    trail = []  # each step's pass, d loss / d output and gradients, for the reverse pass
    for _ in range(steps):
        written = forward(theta, sx)
        if written is None or not loss.fits(written.output, sy):
            return None
        d_output = loss.gradient(written.output, sy)
        d_output = d_output if scale == 1 else d_output * scale
        grads = written.backward(d_output, adapted)
        trail.append((written, d_output, grads))
        theta = {**theta, **{n: theta[n] - alpha[n] * grads[n] for n in adapted}}
    written = forward(theta, qx)
    if written is None or not loss.fits(written.output, qy):
        return None
    losses = loss.losses(written.output, qy)
    metrics = loss.metrics(written.output, qy, losses)
    v = written.backward(loss.gradient(written.output, qy) / tasks, names)  # [T, ...] each
    rate_grads: dict[str, Tensor] = {}
    for written, d_output, grads in reversed(trail):
        for n in adapted:
            rate = rates[n]
            if isinstance(rate, Tensor) and rate.requires_grad:
                part = -(grads[n] * v[n]).sum(0)
                part = part.sum_to_size(rate.shape)  # a step size per tensor: summed
                rate_grads[n] = part if n not in rate_grads else rate_grads[n] + part
        if first_order:
            continue
        direction = {n: alpha[n] * v[n] for n in adapted}
        tangent = written.tangent(direction)
        r_output = loss.hessian_product(written.output, sy, tangent)
        r_output = r_output if scale == 1 else r_output * scale
        hessian = written.tangent_backward(d_output, r_output, direction, names)
        v = {n: v[n] - hessian[n] for n in names}
    return Written(losses, metrics, {n: g.sum(0) for n, g in v.items()}, rate_grads)
