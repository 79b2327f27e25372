"""MAML's meta-gradient against references: finite differences and a plain per-task loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metacli.algorithms.fomaml import FOMAML, FOMAMLConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.build import build
from metacli.engine.inner import last
from metacli.evaluation import evaluate
from metacli.loop import meta_step
from metacli.models.mlp import MLP, MLPConfig
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch
from metacli.tasks.sinusoid import Sinusoid, SinusoidConfig
from tests.conftest import compose_config

STEPS, LR = 2, 0.1


def setup(hidden: list[int], activation: str, tasks: int = 4) -> tuple[Sinusoid, MLP, TaskBatch]:
    task = Sinusoid(SinusoidConfig(shots=5, queries=7))
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=hidden, activation=activation), (1,), 1).double()
    batch = task.sample(tasks, "train", torch.Generator().manual_seed(3))
    return (
        task,
        model,
        TaskBatch(
            *(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
        ),
    )


def flat_grad(algorithm: MAML, batch: TaskBatch) -> torch.Tensor:
    algorithm.zero_grad()
    algorithm.meta_loss(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in algorithm.model.parameters()])


def reference_meta_grad(model: nn.Module, batch: TaskBatch, first_order: bool) -> torch.Tensor:
    """MAML the way `higher`/learn2learn users write it: a Python loop over tasks."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    total = torch.zeros(())
    for i in range(len(batch)):
        fast = params
        for _ in range(STEPS):
            out = torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (batch.support_x[i],)
            )
            inner = ((out - batch.support_y[i]) ** 2).mean()
            grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [p - LR * g for p, g in zip(fast, grads, strict=True)]
        out = torch.func.functional_call(
            model, dict(zip(names, fast, strict=True)), (batch.query_x[i],)
        )
        total = total + ((out - batch.query_y[i]) ** 2).mean()
    grads = torch.autograd.grad(total / len(batch), params)
    return torch.cat([g.flatten() for g in grads])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_per_task_loop_reference(
    float64, batching: str, first_order: bool
) -> None:
    task, model, batch = setup([16, 16], "relu")
    cls, config = (FOMAML, FOMAMLConfig) if first_order else (MAML, MAMLConfig)
    algorithm = cls(config(inner_lr=LR, inner_steps=STEPS, batching=batching), model, task)
    ours = flat_grad(algorithm, batch)
    assert relative_error(ours, reference_meta_grad(model, batch, first_order)) < 1e-8


def test_second_order_meta_gradient_matches_central_finite_differences(float64) -> None:
    task, model, batch = setup([4, 4], "tanh", tasks=3)  # smooth, so differences are exact
    algorithm = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS), model, task)
    analytic = flat_grad(algorithm, batch)
    params = list(model.parameters())
    numeric = torch.zeros_like(analytic)
    eps, index = 1e-6, 0
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(flat.numel()):
                original = flat[j].item()
                flat[j] = original + eps
                plus = algorithm.meta_loss(batch).loss.item()
                flat[j] = original - eps
                minus = algorithm.meta_loss(batch).loss.item()
                flat[j] = original
                numeric[index] = (plus - minus) / (2 * eps)
                index += 1
    assert relative_error(analytic, numeric) < 1e-6
    # First-order MAML drops the Hessian term, which is far from zero here.
    first_order = flat_grad(
        FOMAML(FOMAMLConfig(inner_lr=LR, inner_steps=STEPS), model, task), batch
    )
    assert relative_error(first_order, numeric) > 1e-3


def test_one_step_first_order_gradient_is_query_gradient_at_adapted_params(float64) -> None:
    task, model, batch = setup([8], "tanh", tasks=1)
    algorithm = FOMAML(FOMAMLConfig(inner_lr=LR, inner_steps=1), model, task)
    ours = flat_grad(algorithm, batch)
    rng = TaskRandom(torch.tensor(0))
    steps = algorithm.adapt(
        dict(model.named_parameters()), batch.support_x[0], batch.support_y[0], 1, LR, True, rng
    )
    adapted = {k: v.detach().requires_grad_() for k, v in last(steps).params.items()}
    loss = algorithm.support_loss(adapted, batch.query_x[0], batch.query_y[0], 1, rng)
    expected = torch.autograd.grad(loss, list(adapted.values()))
    assert relative_error(ours, torch.cat([g.flatten() for g in expected])) < 1e-10


def test_evaluate_reports_every_inner_step_and_matches_loop(float64) -> None:
    task, model, batch = setup([16], "relu", tasks=5)
    vmapped = MAML(MAMLConfig(inner_lr=LR, test_inner_steps=4, batching="vmap"), model, task)
    looped = MAML(MAMLConfig(inner_lr=LR, test_inner_steps=4, batching="loop"), model, task)
    a, b = vmapped.evaluate(batch), looped.evaluate(batch)
    assert a.metric.shape == (5, 5) and a.loss.shape == (5, 5)
    torch.testing.assert_close(a.metric, b.metric, rtol=1e-12, atol=1e-12)
    # Step 0 is the unadapted model.
    with torch.no_grad():
        before = ((model(batch.query_x) - batch.query_y) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(a.metric[:, 0], before)
    assert not any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_short_meta_training_learns_sinusoids(algo: str) -> None:
    c = build(
        compose_config(f"algo={algo}", "device=cpu", "train.meta_batch_size=10", "optim.lr=0.01")
    )
    before = evaluate(c, "val", 100, 100)
    for _ in range(400):
        meta_step(c, None)
    after = evaluate(c, "val", 100, 100)
    # 10 inner steps from the meta-learned initialisation beat the starting point clearly.
    assert after.final < 0.5 * before.final
    assert after.final < 0.5 * after.metric_mean[0]
