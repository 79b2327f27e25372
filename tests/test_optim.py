"""metacli.optim: torch's Adam and SGD, bit for bit, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from metacli.optim import OuterAdam, OuterSGD

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
CASES: dict[str, tuple[Factory, Factory]] = {
    "adam": (
        lambda g: OuterAdam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6, foreach=True),
        lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6, foreach=True),
    ),
    "adam-loop": (
        lambda g: OuterAdam(g, lr=0.01, foreach=False, weight_decay=0.1),
        lambda g: torch.optim.Adam(g, lr=0.01, foreach=False, weight_decay=0.1),
    ),
    "sgd": (
        lambda g: OuterSGD(g, lr=0.05, momentum=0.7, nesterov=True, foreach=True),
        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.7, nesterov=True, foreach=True),
    ),
    "adam-fused": (  # optim.fused=true
        lambda g: OuterAdam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6, fused=True),
        lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.8, 0.99), eps=1e-6, fused=True),
    ),
    "sgd-fused": (
        lambda g: OuterSGD(g, lr=0.05, momentum=0.7, nesterov=True, fused=True),
        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.7, nesterov=True, fused=True),
    ),
}


def groups(seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    model = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))]
    rates = [torch.nn.Parameter(torch.rand(5, generator=gen, dtype=torch.float64))]
    return [{"params": model, "name": "model"}, {"params": rates, "name": "rates", "lr": 0.003}]


def steps(optimizer: torch.optim.Optimizer, n: int, start: int = 0) -> list[torch.Tensor]:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i in range(start, start + n):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(((p - 0.1 * i) ** 3).sum() for p in params)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("case", CASES)
def test_same_numbers_and_state_as_torch(case: str) -> None:
    ours_factory, theirs_factory = CASES[case]
    ours, theirs = ours_factory(groups(0)), theirs_factory(groups(0))
    for a, b in zip(steps(ours, 5), steps(theirs, 5), strict=True):
        assert torch.equal(a, b)
    # The state dicts are interchangeable: each continues from the other's state.
    mine, its = ours.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == its["param_groups"]
    crossed_ours, crossed_theirs = ours_factory(groups(1)), theirs_factory(groups(1))
    crossed_ours.load_state_dict(its)
    crossed_theirs.load_state_dict(mine)
    for p, q in zip(
        [p for g in crossed_ours.param_groups for p in g["params"]],
        [p for g in ours.param_groups for p in g["params"]],
        strict=True,
    ):
        p.data.copy_(q)
    for p, q in zip(
        [p for g in crossed_theirs.param_groups for p in g["params"]],
        [p for g in theirs.param_groups for p in g["params"]],
        strict=True,
    ):
        p.data.copy_(q)
    for a, b in zip(steps(crossed_ours, 3, 5), steps(crossed_theirs, 3, 5), strict=True):
        assert torch.equal(a, b)


def test_step_leaves_gradients_mode_as_it_found_it() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = OuterAdam([weight], lr=0.1)
    weight.grad = torch.ones(2)
    with torch.enable_grad():
        optimizer.step()
        assert torch.is_grad_enabled()
    assert weight.grad_fn is None  # the update itself was not recorded
    assert torch.allclose(weight.detach(), torch.full((2,), 0.9))


def test_building_and_stepping_imports_no_dynamo() -> None:
    """The point of the module: torch's own optimizers import torch._dynamo (seconds)."""
    code = (
        "import sys, torch\n"
        "from metacli.build import make_optimizer\n"
        "from metacli.config import OptimConfig\n"
        "for name in ('adam', 'sgd'):\n"
        "    w = torch.nn.Parameter(torch.ones(3))\n"
        "    o = make_optimizer(OptimConfig(name=name), {'model': [w]})\n"
        "    o.zero_grad(); (w ** 2).sum().backward(); o.step()\n"
        "    o.load_state_dict(o.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
        "o = torch.optim.Adam([w])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]  # ours did not import it; torch's does


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optim_fused_builds_torchs_fused_kernel_with_the_same_update(name: str) -> None:
    """``optim.fused=true``: the fused kernel, the foreach update to rounding."""
    from metacli.build import make_optimizer
    from metacli.config import OptimConfig

    built = {}
    for fused in (False, True):
        cfg = OptimConfig(name=name, lr=0.01, momentum=0.5, fused=fused)
        optimizer = make_optimizer(cfg, {"model": groups(0)[0]["params"]})
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)
        assert optimizer.param_groups[0]["foreach"] is (None if fused else True)
        built[fused] = steps(optimizer, 20)
    for a, b in zip(built[False], built[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
