"""iMAML's implicit meta-gradient (float64).

1. Where the inner loop reaches its exact minimum (a regression that is linear in the
   adapted weights), the implicit meta-gradient with the dampings off equals the exact
   gradient of the query loss at the closed-form minimiser, differentiated by autograd,
   for the adapted weights and for those the inner loop leaves alone.
2. On a nonlinear network with the authors' dampings, it equals an independent per-task
   implementation in the structure of aravindr93/imaml_dev: flat parameter vectors,
   Hessian-vector products by double backward, their conjugate-gradient recursion.
3. With ``algo.test_lam=0`` the evaluation is plain fine-tuning, MAML's.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.imaml import IMAML, IMAMLConfig, conjugate_gradient
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.models.mlp import MLP, MLPConfig
from metacli.tasks.base import TaskBatch
from metacli.tasks.sinusoid import Sinusoid, SinusoidConfig
from tests.test_algorithms import double, grads_of

pytestmark = pytest.mark.usefixtures("float64")


def regression(hidden: list[int], tasks: int = 3) -> tuple[Sinusoid, MLP, TaskBatch]:
    task = Sinusoid(SinusoidConfig(shots=5, queries=6))
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=hidden, activation="tanh"), (1,), 1).double()
    return task, model, double(task.sample(tasks, "train", torch.Generator().manual_seed(1)))


def features(model: MLP, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """The head's input with a column of ones: [S, d + 1]."""
    body = {n: p for n, p in params.items() if not n.startswith("head.")}
    hidden = torch.func.functional_call(model.body, {k[5:]: v for k, v in body.items()}, (x,))
    return torch.cat([hidden, torch.ones(x.shape[0], 1)], dim=1)


def exact_meta_loss(model: MLP, batch: TaskBatch, lam: float) -> Tensor:
    """Mean query MSE at the closed-form minimiser of each task's support MSE plus
    (lam / 2) ||phi - theta_head||^2 over the head (the body as it is)."""
    params = dict(model.named_parameters())
    theta = torch.cat([params["head.weight"].flatten(), params["head.bias"]])
    total = torch.zeros(())
    for i in range(len(batch)):
        fs = features(model, params, batch.support_x[i])
        y = batch.support_y[i].flatten()
        s = fs.shape[0]
        # d/dphi [ ||fs phi - y||^2 / s + lam / 2 ||phi - theta||^2 ] = 0
        a = 2 * fs.T @ fs / s + lam * torch.eye(fs.shape[1])
        phi = torch.linalg.solve(a, 2 * fs.T @ y / s + lam * theta)
        fq = features(model, params, batch.query_x[i])
        total = total + F.mse_loss(fq @ phi, batch.query_y[i].flatten())
    return total / len(batch)


@pytest.mark.parametrize("hidden", [[], [4]])
def test_implicit_gradient_is_exact_at_the_inner_minimum(hidden: list[int]) -> None:
    """hidden=[]: linear regression, every weight adapted; [4]: the head adapted on a
    tanh body's features, the body's meta-gradient through the implicit cross term."""
    task, model, batch = regression(hidden)
    lam = 0.7
    dim = (hidden[-1] if hidden else 1) + 1
    cfg = IMAMLConfig(
        adapt="all" if not hidden else "head",
        lam=lam,
        inner_lr=0.05,
        inner_steps=1500,  # contraction (1 - 0.05 lam) per step: converged to 1e-16
        cg_steps=dim,  # conjugate gradient is exact in dim steps
        cg_damping=0.0,
        lam_damping=0.0,
    )
    imaml = IMAML(cfg, model, task)
    out = imaml.meta_loss(batch)
    ours = grads_of(model, out.loss)
    exact = grads_of(model, exact_meta_loss(model, batch, lam))
    assert ours.keys() == exact.keys()
    for name in exact:
        torch.testing.assert_close(ours[name], exact[name], rtol=1e-7, atol=1e-10)
    assert out.terms["cg_residual"] < 1e-6
    torch.testing.assert_close(out.loss, exact_meta_loss(model, batch, lam))


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def textbook_cg(evaluator: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """imaml_dev's ``cg_solve`` on flat vectors (from zero, no early stop)."""
    x = torch.zeros_like(b)
    r = b - evaluator(x)
    p = r.clone()
    for _ in range(steps):
        rdotr = r.dot(r)
        ap = evaluator(p)
        alpha = rdotr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        p = r + (r.dot(r) / rdotr) * p
    return x


def reference_imaml(model: MLP, batch: TaskBatch, cfg: IMAMLConfig) -> dict[str, Tensor]:
    """imaml_dev's structure, task by task: SGD steps on a copy of the weights (here on the
    regularised loss), the query gradient as a flat vector, A v = (1 + damping) v +
    Hv / (lam + lam_damping) by double backward, and the textbook CG recursion."""
    theta = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    total = torch.zeros(sum(t.numel() for t in theta))

    def loss_at(weights: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x,))
        return F.mse_loss(out, y)

    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        fast = [t.clone().requires_grad_() for t in theta]
        for _ in range(cfg.inner_steps):
            reg = sum(
                0.5 * cfg.lam * ((f - t) ** 2).sum() for f, t in zip(fast, theta, strict=True)
            )
            grads = torch.autograd.grad(loss_at(fast, sx, sy) + reg, fast)
            fast = [
                (f - cfg.inner_lr * g).detach().requires_grad_()
                for f, g in zip(fast, grads, strict=True)
            ]
        b = flat(list(torch.autograd.grad(loss_at(fast, qx, qy), fast)))

        def evaluator(
            v: Tensor, fast: list[Tensor] = fast, sx: Tensor = sx, sy: Tensor = sy
        ) -> Tensor:
            g = flat(list(torch.autograd.grad(loss_at(fast, sx, sy), fast, create_graph=True)))
            hv = flat(list(torch.autograd.grad((g * v).sum(), fast)))
            return (1.0 + cfg.cg_damping) * v + hv / (cfg.lam + cfg.lam_damping)

        total = total + textbook_cg(evaluator, b, cfg.cg_steps) / len(batch)
    out, offset = {}, 0
    for name, t in zip(names, theta, strict=True):
        out[name] = total[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_meta_gradient_matches_the_authors_structure(batching: str) -> None:
    task, model, batch = regression([8, 8])
    cfg = IMAMLConfig(inner_lr=0.02, inner_steps=6, lam=2.0, cg_steps=4, batching=batching)
    ours = grads_of(model, IMAML(cfg, model, task).meta_loss(batch).loss)
    reference = reference_imaml(model, batch, cfg)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-8, atol=1e-11)


def test_conjugate_gradient_solves_a_symmetric_system() -> None:
    torch.manual_seed(0)
    m = torch.randn(6, 6)
    a = m @ m.T + 0.5 * torch.eye(6)
    b = {"x": torch.randn(6)}
    x, residual = conjugate_gradient(lambda u: {"x": a @ u["x"]}, b, 6)
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b["x"]))
    assert residual < 1e-8
    _, residual2 = conjugate_gradient(lambda u: {"x": a @ u["x"]}, b, 2)
    assert residual2 > residual  # fewer steps, a visible residual


def test_evaluation_without_the_proximal_term_is_fine_tuning() -> None:
    task, model, batch = regression([8])
    imaml = IMAML(IMAMLConfig(inner_lr=0.02, inner_steps=4, test_lam=0.0), model, task)
    maml = MAML(MAMLConfig(inner_lr=0.02, inner_steps=4, test_inner_steps=4), model, task)
    torch.testing.assert_close(imaml.evaluate(batch).loss, maml.evaluate(batch).loss)
    pulled = IMAML(IMAMLConfig(inner_lr=0.02, inner_steps=4, lam=5.0), model, task)
    assert not torch.allclose(pulled.evaluate(batch).loss, maml.evaluate(batch).loss)
