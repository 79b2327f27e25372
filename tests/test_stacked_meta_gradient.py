"""The meta-gradient written out over a stack of tasks
(``metacli.engine.stacked_meta_gradient``) equals autograd's, in float64: the MLP's tangent
passes give autograd's Hessian-vector products, the task losses' derivatives are
autograd's, and every algorithm it serves gets the same meta-loss, metric and
meta-gradient as the per-task path (vmap and autograd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from metacli.build import build
from metacli.engine import stacked_meta_gradient
from metacli.models import mlp
from metacli.tasks.base import StackedCrossEntropy, StackedMSE
from tests.conftest import TINY, compose_config, run_cli


def net(activation: str, head: bool) -> mlp.MLP:
    return mlp.MLP(mlp.MLPConfig(hidden=[7, 5], activation=activation), (3,), 2 if head else None)


def per_task(params: dict[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """Each weight made different for each task (as after an inner step)."""
    return {n: p + 0.1 * torch.randn(tasks, *p.shape) for n, p in params.items()}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_tangent_passes_give_autograds_hessian_vector_products(
    float64: Any, activation: str, head: bool, shared: bool
) -> None:
    model = net(activation, head)
    tasks = 4
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = base if shared else per_task(base, tasks)
    x = torch.randn(tasks, 6, 3)
    upstream = torch.randn(tasks, 6, model(x[0]).shape[-1])  # d loss / d output, fixed
    names = list(params)

    def grad_of(p: dict[str, Tensor]) -> dict[str, Tensor]:
        written = model.stacked_pass(p, x)
        assert written is not None
        return written.backward(upstream * written.output, names)  # loss: sum(u * out^2 / 2)

    # a direction per task on every weight, and on the last layer alone (ANIL)
    for moved in (names, names[-2:]):
        direction = {n: torch.randn(tasks, *base[n].shape) for n in moved}

        def along(t: Tensor, direction: dict[str, Tensor] = direction) -> dict[str, Tensor]:
            moved_params = {n: params[n] + t * direction.get(n, 0) for n in names}
            return grad_of(moved_params)

        _, expected = torch.func.jvp(along, (torch.zeros(()),), (torch.ones(()),))
        for after_backward in (True, False):  # with backward's intermediate results or not
            written = model.stacked_pass(params, x)
            assert written is not None
            grad = upstream * written.output
            if after_backward:
                written.backward(grad, names)
            tangent = written.tangent(direction)
            r_grad = upstream * tangent  # d(u * out) along the direction
            ours = written.tangent_backward(grad, r_grad, direction, names)
            assert sorted(ours) == sorted(names)
            for name in names:
                torch.testing.assert_close(ours[name], expected[name], rtol=1e-11, atol=1e-13)


def test_stacked_losses_equal_the_tasks_losses_and_their_derivatives(float64: Any) -> None:
    prediction = torch.randn(3, 5, 4)
    targets = {"mse": torch.randn(3, 5, 4), "xent": torch.randint(0, 4, (3, 5))}
    tangent = torch.randn(3, 5, 4)
    forms = {"mse": StackedMSE(), "xent": StackedCrossEntropy()}
    for key, form in forms.items():
        task = build(
            compose_config(
                "task=sinusoid" if key == "mse" else "task=synthetic", "model=mlp", "device=cpu"
            )
        ).task
        target = targets[key]
        assert form.fits(prediction, target)
        losses = form.losses(prediction, target)
        for t in range(3):
            torch.testing.assert_close(losses[t], task.loss(prediction[t], target[t]))
            torch.testing.assert_close(
                form.metrics(prediction, target, losses)[t], task.metric(prediction[t], target[t])
            )

        leaf = prediction.clone().requires_grad_()
        total = sum(task.loss(leaf[t], target[t]) for t in range(3))
        (gradient,) = torch.autograd.grad(total, leaf, create_graph=True)
        (expected,) = torch.autograd.grad((gradient * tangent).sum(), leaf)
        torch.testing.assert_close(form.gradient(prediction, target), gradient.detach())
        torch.testing.assert_close(form.hessian_product(prediction, target, tangent), expected)
    assert not forms["mse"].fits(prediction, targets["mse"][..., :1])  # broadcasting
    assert not forms["xent"].fits(prediction, targets["xent"][:, :1])


SINUSOID = ["task=sinusoid", "model=mlp", "model.hidden=[16,16]", "task.shots=6", "task.queries=5"]
CLASSES = ["task=synthetic", "model=mlp", "model.hidden=[16]", "task.image_size=6"]
WRITTEN = [  # (algorithm, overrides): each takes the written meta-gradient
    ("maml", [*SINUSOID, "algo.inner_steps=1"]),
    ("maml", [*SINUSOID, "algo.inner_steps=3"]),
    ("maml", [*SINUSOID, "model.activation=tanh"]),
    ("maml", [*SINUSOID, "algo.inner_loss=sum"]),
    ("maml", ["task=sinusoid_nonexclusive", "model=mlp", "model.hidden=[8]"]),
    ("fomaml", SINUSOID),
    ("anil", SINUSOID),
    ("anil", [*SINUSOID, "model.activation=tanh"]),
    ("metasgd", SINUSOID),
    ("metasgd", [*SINUSOID, "algo.first_order=true"]),
    ("maml", CLASSES),
    ("maml", [*CLASSES, "algo.inner_loss=sum_over_shots", "model.activation=tanh"]),
    ("anil", [*CLASSES, "algo.inner_loss=sum"]),
]
DECLINED = [  # the per-task path, with the same numbers
    ("maml", [*SINUSOID, "update=adam"]),
    ("maml", [*SINUSOID, "algo.inner_batch=4"]),
    ("maml", [*SINUSOID, "algo.batching=loop"]),
    ("maml", [*SINUSOID, "algo.batching=vmap"]),
    ("mamlpp", SINUSOID),
]


def outcome(algo: str, task: list[str], written: bool) -> tuple[dict[str, Tensor], int]:
    """Meta-loss, metric and meta-gradient of one meta-batch in float64, and how many
    times the written meta-gradient ran."""
    c = build(
        compose_config(
            f"algo={algo}",
            "algo.inner_steps=2",
            "algo.inner_lr=0.1",
            *task,
            f"model.written_backward={str(written).lower()}",
            "device=cpu",
        )
    )
    batch = c.task.sample(3, "train", torch.Generator().manual_seed(5))
    batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in batch.tensors()))
    c.algorithm.to(torch.float64)
    ran = [0]
    inner = stacked_meta_gradient.meta_gradient

    def spy(*args: Any) -> Any:
        result = inner(*args)
        ran[0] += result is not None
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("metacli.algorithms.maml.meta_gradient", spy)
        out = c.algorithm.meta_loss(batch)
    leaves = [p for p in c.algorithm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, leaves)
    numbers = {"loss": out.loss.detach(), "metric": out.metric, "grad": torch.cat(
        [g.flatten() for g in grads]
    )}  # fmt: skip
    return numbers, ran[0]


@pytest.mark.parametrize(("algo", "task"), WRITTEN, ids=lambda v: v if isinstance(v, str) else "-")
def test_written_meta_gradient_equals_autograds(float64: Any, algo: str, task: list[str]) -> None:
    ours, ran = outcome(algo, task, written=True)
    theirs, autograd_ran = outcome(algo, task, written=False)
    assert (ran, autograd_ran) == (1, 0)
    assert theirs["grad"].norm() > 1e-6  # not a vacuous comparison
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("algo", "task"), DECLINED, ids=lambda v: v if isinstance(v, str) else "-")
def test_what_is_not_written_out_takes_the_per_task_path(
    float64: Any, algo: str, task: list[str]
) -> None:
    ours, ran = outcome(algo, task, written=True)
    theirs, _ = outcome(algo, task, written=False)
    assert ran == 0
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12)


def test_the_stacked_path_is_taken_where_it_serves() -> None:
    preset = ("experiment=maml_sinusoid", "device=cpu")
    assert build(compose_config(*preset)).algorithm.batching == "stacked"  # auto: stacked
    assert build(compose_config(*preset, "algo.batching=stacked")).algorithm.stacks()
    for other in ("algo.batching=vmap", "model.written_backward=false", "update=adam"):
        assert build(compose_config(*preset, other)).algorithm.batching == "vmap"
    hybrid = build(compose_config("algo=hybrid", *SINUSOID, "device=cpu"))
    assert not hybrid.algorithm.stacks()  # a task loss of its own


@pytest.mark.parametrize(
    "overrides",
    [
        ("algo=reptile",),
        ("update=adam",),
        ("algo.inner_batch=4",),
        ("model=conv4", "task=synthetic"),
    ],
)
def test_asking_for_stacked_where_it_cannot_serve_is_a_clear_error(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    folder = tmp_path / "run"
    result = run_cli(
        "train", *TINY, *overrides, "algo.batching=stacked", f"hydra.run.dir={folder}",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "algo.batching=stacked" in output and "algo.batching=auto" in output
    assert "Traceback" not in output
    assert not folder.exists()


def test_learned_step_sizes_per_tensor_get_their_meta_gradient(float64: Any) -> None:
    """A rule's learned step size per tensor (what the optimizer space makes of its
    members' rates) is one number broadcast over its tensor: its meta-gradient is summed."""
    results = []
    for written in (True, False):
        c = build(
            compose_config("algo=maml", *SINUSOID, f"model.written_backward={str(written).lower()}")
        )
        c.algorithm.rule.learn_hyperparameters(0.05)
        c.algorithm.to(torch.float64)
        batch = c.task.sample(3, "train", torch.Generator().manual_seed(2))
        batch = type(batch)(*(t.double() for t in batch.tensors()))
        rates = list(c.algorithm.rule.parameters())
        assert len(rates) == 6 and all(r.dim() == 0 for r in rates)
        loss = c.algorithm.meta_loss(batch).loss
        results.append(torch.autograd.grad(loss, [*c.algorithm.model.parameters(), *rates]))
        assert c.algorithm.batching == ("stacked" if written else "vmap")
    assert torch.cat([g.flatten() for g in results[1][-6:]]).norm() > 1e-6
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
