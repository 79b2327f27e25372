"""CAVIA (float64): the meta-gradient against a per-task reference written as the
authors' code (lmzintgraf/cavia), the FiLM'd Conv-4 against their CondConvNet's forward,
and the context reset to zero for every task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.cavia import CAVIA, CAVIAConfig
from metacli.build import build
from metacli.errors import ConfigError
from metacli.loop import meta_step
from metacli.models.conv4 import Conv4, Conv4Config
from metacli.models.mlp import MLP, MLPConfig
from tests.conftest import compose_config
from tests.test_algorithms import grads_of
from tests.test_imaml import regression

pytestmark = pytest.mark.usefixtures("float64")
LR, STEPS, CONTEXT = 0.5, 2, 3


def reference_meta_gradient(model: MLP, batch, lr: float, steps: int) -> dict[str, Tensor]:  # type: ignore[no-untyped-def]
    """regression/cavia.py: per task, the context from zeros, ``steps`` updates
    ``context - lr * grad`` with the graph kept, the query loss's gradient for the shared
    parameters, averaged over the tasks."""
    shared = {n: p for n, p in model.named_parameters() if n != "context"}
    total = {n: torch.zeros_like(p) for n, p in shared.items()}
    for i in range(len(batch)):
        context = torch.zeros(CONTEXT, requires_grad=True)

        def forward(x: Tensor, context: Tensor) -> Tensor:
            h = torch.cat([x, context.expand(x.shape[0], -1)], dim=1)
            h = torch.tanh(F.linear(h, shared["body.1.weight"], shared["body.1.bias"]))
            return F.linear(h, shared["head.weight"], shared["head.bias"])

        for _ in range(steps):
            loss = F.mse_loss(forward(batch.support_x[i], context), batch.support_y[i])
            (grad,) = torch.autograd.grad(loss, context, create_graph=True)
            context = context - lr * grad
        query = F.mse_loss(forward(batch.query_x[i], context), batch.query_y[i])
        for n, g in zip(shared, torch.autograd.grad(query, list(shared.values())), strict=True):
            total[n] += g / len(batch)
    return total


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_meta_gradient_matches_the_authors_structure(batching: str) -> None:
    task, _, batch = regression([6])
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=[6], activation="tanh", context=CONTEXT), (1,), 1).double()
    cavia = CAVIA(CAVIAConfig(inner_lr=LR, inner_steps=STEPS, batching=batching), model, task)
    ours = grads_of(model, cavia.meta_loss(batch).loss)
    reference = reference_meta_gradient(model, batch, LR, STEPS)
    assert "model.context" not in ours and "context" not in ours  # never meta-learned
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-9, atol=1e-12)
    assert cavia.adapted_names() == ["context"]


def test_film_conv4_is_the_authors_conditioned_network() -> None:
    """classification/models.py's CondConvNet.forward with context_in=[F, F, T, F, F]:
    conv, batch norm (batch statistics), max-pool, then gamma * h + beta at block 3,
    ReLU; metacli's Conv-4 with the same weights gives the same logits."""
    torch.manual_seed(0)
    model = Conv4(Conv4Config(filters=4, context=CONTEXT, film=[3]), (3, 20, 20), 5).double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["context"].copy_(torch.randn(CONTEXT))
    x = torch.randn(6, 3, 20, 20)
    h = x
    for b in range(4):
        h = F.conv2d(
            h, params[f"blocks.{b}.conv.weight"], params[f"blocks.{b}.conv.bias"], padding=1
        )
        h = F.batch_norm(
            h, None, None, params[f"blocks.{b}.norm.weight"], params[f"blocks.{b}.norm.bias"], True
        )
        h = F.max_pool2d(h, 2)
        if b == 2:
            film = F.linear(params["context"], params["films.3.0.weight"], params["films.3.0.bias"])
            h = film[:4].view(1, -1, 1, 1) * h + film[4:].view(1, -1, 1, 1)
        h = F.relu(h)
    expected = F.linear(h.flatten(1), params["head.weight"], params["head.bias"])
    torch.testing.assert_close(model(x), expected)


def test_context_starts_at_zero_for_every_task() -> None:
    """Training moves the shared weights, never the context, so every task (training and
    evaluation) adapts from zeros."""
    c = build(compose_config("algo=cavia", "train.meta_batch_size=3", "device=cpu"))
    before = {n: p.detach().clone() for n, p in c.algorithm.model.named_parameters()}
    for _ in range(3):
        meta_step(c, None)
    after = dict(c.algorithm.model.named_parameters())
    assert torch.equal(after["context"], torch.zeros(5, dtype=after["context"].dtype))
    assert not torch.equal(after["body.1.weight"], before["body.1.weight"])
    assert c.algorithm.model.body[1].in_features == 1 + 5  # the input and the context


def test_cavia_needs_a_model_with_a_context() -> None:
    with pytest.raises(ConfigError, match="algo=cavia adapts context parameters"):
        build(compose_config("algo=cavia", "task=synthetic", "model=resnet12"))
    with pytest.raises(ConfigError, match=r"Set algo\.context_params=7 instead"):
        build(compose_config("algo=cavia", "model.context=7"))
    with pytest.raises(ConfigError, match=r"Set algo\.context_in=\[2\] instead"):
        build(
            compose_config(
                "algo=cavia", "task=synthetic", "model=conv4", "model.context=5", "model.film=[2]"
            )
        )
