"""The MLP's backward pass written out (``Model.functional_backward``) gives autograd's
inner gradients, and so the same meta-gradients, second order included, in float64."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.build import build
from metacli.models import mlp
from tests.conftest import REPO, compose_config


def model(activation: str, head: bool) -> mlp.MLP:
    cfg = mlp.MLPConfig(hidden=[7, 5], activation=activation)
    return mlp.MLP(cfg, (3,), 2 if head else None)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("head", [True, False])
def test_backward_equals_autograd(float64: Any, activation: str, head: bool) -> None:
    net = model(activation, head)
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    x = torch.randn(11, 3)
    written = net.functional_backward(params, x)
    assert written is not None
    out, backward = written
    torch.testing.assert_close(out, net.functional(params, {}, x), rtol=0, atol=0)
    upstream = torch.randn_like(out)
    names = list(params)
    grads = torch.autograd.grad(out, list(params.values()), upstream, retain_graph=True)
    expected = dict(zip(names, grads, strict=True))
    # every parameter, the last layer alone (ANIL), and one inner layer's weight alone
    last = names[-2:]
    for asked in (names, last, [names[2]]):
        grads = backward(upstream, asked)
        assert sorted(grads) == sorted(asked)
        for name in asked:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-14)
    # the written gradient is differentiable: its derivative is autograd's double backward
    probe = torch.randn(params[names[0]].shape)
    first = backward(upstream, names)[names[0]]
    ours = torch.autograd.grad((first * probe).sum(), params[names[2]], retain_graph=True)
    theirs = torch.autograd.grad(
        (torch.autograd.grad(out, params[names[0]], upstream, create_graph=True)[0] * probe).sum(),
        params[names[2]],
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)


def test_loss_gradients_equal_autograd(float64: Any) -> None:
    prediction = torch.randn(9, 4, requires_grad=True)
    target = torch.randn(9, 4)
    (expected,) = torch.autograd.grad(F.mse_loss(prediction, target), prediction)
    sinusoid = build(compose_config("task=sinusoid", "model=mlp", "device=cpu")).task
    mse_gradient = sinusoid.loss_gradient
    torch.testing.assert_close(mse_gradient(prediction, target), expected, rtol=1e-12, atol=0)
    assert mse_gradient(prediction, target[:, :1]) is None  # broadcasting: autograd's
    task = build(compose_config("task=synthetic", "model=mlp", "device=cpu")).task
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3, 2, 1])
    (expected,) = torch.autograd.grad(task.loss(prediction, labels), prediction)
    torch.testing.assert_close(task.loss_gradient(prediction, labels), expected, rtol=1e-12, atol=0)


SINUSOID = ["task=sinusoid", "model=mlp", "model.hidden=[16,16]", "task.shots=6", "task.queries=5"]
CLASSES = ["task=synthetic", "model=mlp", "model.hidden=[16]", "task.image_size=6"]
CASES = [
    ("maml", SINUSOID),
    ("fomaml", SINUSOID),
    ("anil", SINUSOID),
    ("metasgd", SINUSOID),
    ("reptile", SINUSOID),
    ("mamlpp", SINUSOID),
    ("maml", [*SINUSOID, "update=metalstm"]),  # a rule that reads the support loss
    ("maml", [*SINUSOID, "model.activation=tanh", "algo.inner_batch=4"]),
    ("maml", [*CLASSES, "algo.inner_loss=sum_over_shots"]),
    ("maml", [*CLASSES, "algo.inner_loss=sum", "update=adam"]),
]


def meta_gradient(algo: str, task: list[str], batching: str, written: bool) -> dict[str, Tensor]:
    c = build(
        compose_config(
            f"algo={algo}",
            *task,
            "algo.inner_steps=2",
            "algo.test_inner_steps=3",
            "algo.inner_lr=0.1",
            f"algo.batching={batching}",
            f"model.written_backward={str(written).lower()}",
            "device=cpu",
        )
    )
    batch = c.task.sample(3, "train", torch.Generator().manual_seed(5))
    batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in batch.tensors()))
    c.algorithm.to(torch.float64)
    calls = counted(c.algorithm.model)
    out = c.algorithm.meta_loss(batch)
    grads = torch.autograd.grad(out.loss, [p for p in c.algorithm.parameters() if p.requires_grad])
    assert (calls[0] > 0) == written, "the written backward pass must be used iff asked"
    evaluation = c.algorithm.evaluate(batch)
    return {
        "loss": out.loss.detach(),
        "grad": torch.cat([g.flatten() for g in grads]),
        "eval": evaluation.loss,
    }


def counted(net: Any) -> list[int]:
    """Count the calls of the model's written passes that returned one: per task
    (``functional_backward``) or on the stacked tasks (``stacked_pass``, whose meta-gradient
    is written out too: tests/test_stacked_meta_gradient.py)."""
    calls = [0]
    for name in ("functional_backward", "stacked_pass"):
        inner = getattr(net, name)

        def written(*args: Any, inner: Any = inner) -> Any:
            result = inner(*args)
            calls[0] += result is not None
            return result

        setattr(net, name, written)
    return calls


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize(("algo", "task"), CASES, ids=lambda v: v if isinstance(v, str) else "-")
def test_meta_gradients_equal_autograd(
    float64: Any, algo: str, task: list[str], batching: str
) -> None:
    ours = meta_gradient(algo, task, batching, written=True)
    theirs = meta_gradient(algo, task, batching, written=False)
    assert theirs["grad"].norm() > 1e-6  # not a vacuous comparison
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12)


def test_an_algorithm_with_its_own_support_loss_keeps_autograd() -> None:
    """The LSTM meta-learner makes its own support loss: the written pass must not
    replace it (the result would be MAML's gradient)."""
    c = build(compose_config("algo=metalstm", *SINUSOID, "device=cpu", "algo.inner_steps=1"))
    calls = counted(c.algorithm.model)
    batch = c.task.sample(2, "train", torch.Generator().manual_seed(0))
    c.algorithm.meta_loss(batch).loss.backward()
    assert calls[0] == 0


def test_a_sinusoid_iteration_imports_no_dynamo() -> None:
    """Without torch.func.grad in the inner loop, nothing imports torch._dynamo (seconds of
    start-up): the written pass keeps it out; autograd's path under vmap brings it in."""
    code = (
        "import sys\n"
        "from tests.conftest import compose_config\n"
        "from metacli.build import build\n"
        "from metacli.loop import meta_step\n"
        "for written in ('true', 'false'):\n"
        "    c = build(compose_config('experiment=maml_sinusoid', 'device=cpu',\n"
        "                             f'model.written_backward={written}'))\n"
        "    meta_step(c, None)\n"
        "    c.algorithm.evaluate(c.task.sample(4, 'val', c.train_generator))\n"
        "    print(c.algorithm.batching, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert out == ["stacked", "False", "vmap", "True"]
