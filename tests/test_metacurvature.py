"""Meta-Curvature's update rule (float64): the transform against learn2learn's way of
writing it (``MetaCurvatureTransform``: permutes and views in TF's layout), the identity
start equal to MAML, and the meta-gradient of the curvature matrices against central
finite differences on a Conv-4 with batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.updates.metacurvature import transform
from tests.test_algorithms import classification, grads_of

pytestmark = pytest.mark.usefixtures("float64")


def learn2learn_style(g: Tensor, mats: list[Tensor]) -> Tensor:
    """learn2learn 0.2.0's ``MetaCurvatureTransform.forward``, written out: biases element
    by element, ``mc_in @ g @ mc_out`` for a matrix, and for a convolution the gradient
    permuted to (kh, kw, n_in, n_out) with n_in, n_out = shape[0], shape[1]."""
    if g.dim() == 1:
        return mats[0] * g
    if g.dim() == 2:
        return mats[0] @ g @ mats[1]
    mc_in, mc_out, mc_f = mats
    n_in, n_out = g.shape[0], g.shape[1]
    n_f = g.numel() // (n_in * n_out)
    update = g.permute(2, 3, 0, 1).contiguous()
    shape = update.shape
    update = update.view(-1, n_out) @ mc_out
    update = mc_f @ update.view(n_f, -1)
    update = update.view(n_f, n_in, n_out)
    update = update.permute(1, 0, 2).contiguous().view(n_in, -1)
    update = mc_in @ update
    update = update.view(n_in, n_f, n_out).permute(1, 0, 2).contiguous().view(shape)
    return update.permute(2, 3, 0, 1).contiguous()


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 3, 3), (6, 2, 1, 5)])
def test_transform_is_learn2learns(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    g = torch.randn(shape)
    if len(shape) == 1:
        mats = [torch.randn(shape)]
    else:
        sizes = [shape[0], shape[1]] + (
            [int(torch.tensor(shape[2:]).prod())] if len(shape) > 2 else []
        )
        mats = [torch.randn(n, n) for n in sizes]
    torch.testing.assert_close(transform(g, mats), learn2learn_style(g, mats))


def test_identity_start_is_maml_and_the_curvature_learns() -> None:
    task, model, batch = classification()
    maml = MAML(MAMLConfig(inner_lr=0.1, inner_steps=2), model, task)
    plain = grads_of(model, maml.meta_loss(batch).loss)
    mc = MAML(MAMLConfig(inner_lr=0.1, inner_steps=2, update="metacurvature"), model, task)
    mc.zero_grad()
    mc.meta_loss(batch).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)
    moved = [p.grad for p in mc.rule.parameters()]
    assert all(g is not None for g in moved) and any(g.abs().sum() > 0 for g in moved)


@pytest.mark.parametrize(("first_order", "steps"), [(False, 2), (True, 1)])
def test_curvature_meta_gradient_matches_finite_differences(first_order: bool, steps: int) -> None:
    """Along random directions of the curvature matrices alone, from a point away from the
    identity. First order with one inner step is exact for the matrices too: the one
    gradient they multiply does not depend on them."""
    task, model, batch = classification(tasks=2)
    cfg = MAMLConfig(
        inner_lr=0.1, inner_steps=steps, update="metacurvature", first_order=first_order
    )
    mc = MAML(cfg, model, task)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in mc.rule.parameters():
            p.add_(0.1 * torch.randn_like(p))
    curvature = list(mc.rule.parameters())
    mc.zero_grad()
    mc.meta_loss(batch).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in curvature])
    eps = 1e-6
    for _ in range(4):
        direction = [torch.randn_like(p) for p in curvature]
        norm = torch.sqrt(sum((d * d).sum() for d in direction))
        direction = [d / norm for d in direction]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(curvature, direction, strict=True):
                    p.add_(sign * eps * d)
                values.append(mc.meta_loss(batch).loss.item())
                for p, d in zip(curvature, direction, strict=True):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = (grad * torch.cat([d.flatten() for d in direction])).sum().item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)
