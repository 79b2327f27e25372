"""Why a sinusoid MAML's evaluation can diverge after a few inner steps (not a timing).

For each meta-test task, the largest eigenvalue lambda_max of the Hessian of the support
loss at the meta-learned initialisation (power iteration on Hessian-vector products). Plain
gradient descent with step alpha is unstable along a direction of curvature lambda when
alpha * lambda > 2: MAML meta-trains ONE step, which does not penalise such directions,
and repeating the step (3-10 at evaluation) amplifies them. Prints, per checkpoint, the
quantiles of alpha * lambda_max and the share of tasks above 2.

    python benchmarks/sharpness.py <run>/checkpoints/best.pt [...] [--shots 5] [--tasks 600]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from metacli.build import build
from metacli.checkpoint import load_weights
from metacli.tasks.base import split_generator


def top_eigenvalue(
    loss_fn: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], iterations: int = 50
) -> float:
    """lambda_max of d2 loss / d params2 by power iteration (Hessian-vector products)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=True)
    vector = [torch.randn(g.shape, generator=torch.Generator().manual_seed(0)) for g in grads]
    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        vector = [v / norm for v in vector]
        dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
        hv = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True)
        value = float(sum((h * v).sum() for h, v in zip(hv, vector, strict=True)))
        vector = list(hv)
    return value


def support_loss(
    task: Any, algorithm: Any, x: Tensor, y: Tensor, params: dict[str, Tensor]
) -> Tensor:
    return task.loss(algorithm.forward_with(params, x), y)


def descends(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    alpha: float,
    steps: int,
) -> bool:
    """Whether ``steps`` plain gradient steps keep the support loss finite and below 1e3."""
    current = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(current)
        current = {n: p - alpha * grads[n] for n, p in current.items()}
    value = float(loss_fn(current))
    return math.isfinite(value) and value < 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--steps", type=int, default=10, help="inner steps, in float64")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    for path in args.checkpoints:
        checkpoint = torch.load(path, weights_only=False, map_location="cpu")
        cfg = OmegaConf.create(checkpoint["config"])
        cfg.task.test_shots, cfg.device.name = args.shots, "cpu"
        c = build(cfg)
        load_weights(c, checkpoint, path)
        algorithm = c.algorithm.double()
        params = {n: p.detach() for n, p in algorithm.initial_params().items()}
        tasks = c.task.sample(args.tasks, "test", split_generator(int(cfg.seed), "test"))
        alpha = float(cfg.algo.test_inner_lr or cfg.algo.inner_lr)
        sharp, diverged = [], 0
        for i in range(args.tasks):
            x, y = tasks.support_x[i].double(), tasks.support_y[i].double()
            loss = partial(support_loss, c.task, algorithm, x, y)
            sharp.append(alpha * top_eigenvalue(loss, params))
            diverged += not descends(loss, params, alpha, args.steps)
        values = torch.tensor(sharp)
        q = torch.quantile(values, torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=values.dtype))
        print(
            f"{path}: alpha * lambda_max over {args.tasks} tasks (K={args.shots}): median "
            f"{q[0]:.2f}, 90% {q[1]:.2f}, 99% {q[2]:.2f}, max {q[3]:.2f}; "
            f"> 2 (GD unstable): {int((values > 2).sum())} tasks; {args.steps} steps in "
            f"float64 end above 1e3 or non-finite on {diverged} tasks"
        )


if __name__ == "__main__":
    main()
