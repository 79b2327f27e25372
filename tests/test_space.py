"""The optimizer space (``algo.update=space``) and its new member ``adam``: Adam and momentum
step for step against torch.optim; a space of one rule is that rule; the expectation is
the probability-weighted sum of the members' updates; a Gumbel draw picks one member per
task with the logits' probabilities and a straight-through gradient; settings are checked.
(That a sampled run is the same under vmap, loop and threads is the contract's ``space``.)"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.adaptive import Adaptive
from metacli.build import Components, build
from metacli.errors import ConfigError
from metacli.loop import sample
from metacli.models.mlp import MLP, MLPConfig
from metacli.streams import TaskRandom, task_keys
from metacli.updates.base import UpdateRule
from metacli.updates.space import SpaceRule
from tests.conftest import compose_config

SINUSOID = ("device=cpu", "model.hidden=[12,12]", "model.activation=tanh")
TINY = ("task=sinusoid", "device=cpu", "model.hidden=[5,4]", "train.meta_batch_size=4")


def adaptive(c: Components) -> Adaptive:
    assert isinstance(c.algorithm, Adaptive)
    return c.algorithm


def space_of(c: Components) -> SpaceRule:
    rule = adaptive(c).rule
    assert isinstance(rule, SpaceRule)
    return rule


def adapt_one_task(c: Components, steps: int, key: int = 0) -> list[dict[str, Tensor]]:
    """The parameters after 0..steps inner steps on one sinusoid task (first order)."""
    algorithm = adaptive(c)
    batch = c.task.sample(1, "train", torch.Generator().manual_seed(0))
    params = {n: p.detach() for n, p in algorithm.initial_params().items()}
    rng = TaskRandom(torch.tensor(key))
    x, y = batch.support_x[0], batch.support_y[0]
    return [s.params for s in algorithm.adapt(params, x, y, steps, algorithm.train_lr, True, rng)]


def torch_steps(c: Components, optimizer: Any, steps: int) -> list[dict[str, Tensor]]:
    """The same task adapted by a torch.optim optimizer on a copy of the model."""
    batch = c.task.sample(1, "train", torch.Generator().manual_seed(0))
    x, y = batch.support_x[0], batch.support_y[0]
    model = MLP(MLPConfig(hidden=[12, 12], activation="tanh"), (1,), 1)
    model.load_state_dict(c.model.state_dict())
    opt = optimizer(model.parameters())
    out = []
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def assert_params_close(ours: dict[str, Tensor], theirs: dict[str, Tensor], tol: float) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=tol, atol=tol)


# --- the adam rule -------------------------------------------------------------------------
@pytest.mark.parametrize("space", [False, True], ids=["rule", "in-space"])
def test_adam_rule_equals_torch_adam_step_for_step(float64, space: bool) -> None:
    """Alone, and as the single member of a space with its step sizes and betas learned
    (through a sigmoid: equal to float64 rounding at their starting values)."""
    settings = ("algo.adam_lr=0.03", "algo.adam_betas=[0.8,0.99]", "algo.adam_eps=1e-6")
    update = ("update=space", "algo.space=[adam]") if space else ("update=adam",)
    c = build(compose_config(*update, *settings, *SINUSOID))
    ours = adapt_one_task(c, 6)
    theirs = torch_steps(c, lambda p: torch.optim.Adam(p, 0.03, (0.8, 0.99), 1e-6), 6)
    for step in range(6):
        assert_params_close(ours[step + 1], theirs[step], 1e-10 if space else 1e-12)
    assert not torch.equal(ours[6]["body.1.weight"], ours[0]["body.1.weight"])


def test_momentum_in_the_space_equals_torch_sgd_with_momentum(float64) -> None:
    c = build(
        compose_config(
            "update=space", "algo.space=[momentum]", "algo.momentum=0.7", "algo.inner_lr=0.05",
            *SINUSOID,
        )
    )  # fmt: skip
    ours = adapt_one_task(c, 4)
    theirs = torch_steps(c, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.7), 4)
    for step in range(4):
        assert_params_close(ours[step + 1], theirs[step], 1e-10)


def test_adam_second_order_meta_gradient_is_finite_where_gradients_are_zero(float64) -> None:
    """A coordinate whose support gradient is exactly zero (a dead ReLU unit) has v = 0:
    a plain sqrt would give inf * 0 = NaN in the second-order meta-gradient."""
    c = build(compose_config("update=adam", "algo.adam_lr=0.01", *TINY, "algo.inner_steps=2"))
    with torch.no_grad():
        first = c.model.get_submodule("body.1")
        first.weight[0].zero_()
        first.bias[0] = -1.0  # unit 0 of the first layer never fires: zero gradients
    batch = sample(c)
    loss = c.algorithm.meta_loss(batch).loss
    grads = torch.autograd.grad(loss, list(c.algorithm.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- the space -----------------------------------------------------------------------------
@pytest.mark.parametrize("member", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("sampling", ["gumbel", "expectation"])
def test_a_space_of_one_rule_is_that_rule(float64, member: str, sampling: str) -> None:
    """Second-order meta-loss and meta-gradient of the initialisation, bit for bit with the
    settings kept; to rounding with them learned (the weight of the one member is 1)."""
    own = {"sgd": (), "momentum": ("algo.momentum=0.5",), "adam": ("algo.adam_lr=0.02",)}
    # (one per-task path for both: the stacked one would round otherwise)
    common = (*TINY, "algo.inner_steps=3", "algo.batching=vmap", *own[member])
    alone = build(compose_config(f"update={member}", *common))
    space_cfg = ("update=space", f"algo.space=[{member}]", f"algo.space_sampling={sampling}")
    for learned in (False, True):
        c = build(compose_config(*space_cfg, f"algo.space_learn_hparams={learned}", *common))
        c.model.load_state_dict(alone.model.state_dict())
        batch = sample(c)
        ours, theirs = c.algorithm.meta_loss(batch), alone.algorithm.meta_loss(batch)
        got = torch.autograd.grad(ours.loss, list(c.model.parameters()))
        expected = torch.autograd.grad(theirs.loss, list(alone.model.parameters()))
        assert ours.terms == {f"space_chose_{member}": torch.tensor(1.0)}
        if not learned:
            assert torch.equal(ours.loss, theirs.loss)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        else:
            torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-12, atol=0)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_expectation_is_the_probability_weighted_sum_of_the_members_updates(float64) -> None:
    """Fixed logits, three members with distinct learned step sizes: each inner step equals
    sum_k p_k * update_k(theta, grad), every member advancing its own state, computed here
    from the members alone."""
    c = build(
        compose_config(
            "update=space", "algo.space_sampling=expectation", "algo.space_temperature=0.5",
            "algo.adam_lr=0.02", *SINUSOID,
        )
    )  # fmt: skip
    space = space_of(c)
    with torch.no_grad():
        space.logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        for k, rate in enumerate(space.rates().values()):
            rate.mul_(1 + 0.1 * k)
    p = torch.softmax(torch.tensor([0.3, -0.2, 0.5]) / 0.5, 0)
    ours = adapt_one_task(c, 3)
    members: list[UpdateRule] = list(space.rules().values())
    batch = c.task.sample(1, "train", torch.Generator().manual_seed(0))
    x, y = batch.support_x[0], batch.support_y[0]
    rng = TaskRandom(torch.tensor(0))
    theta = ours[0]
    states = [m.init(theta, adaptive(c).train_lr, rng) for m in members]
    for step in range(3):
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_() for n, t in theta.items()}
            loss = F.mse_loss(torch.func.functional_call(c.model, leaves, (x,)), y)
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        proposals = []
        for k, member in enumerate(members):
            proposal, states[k] = member.update(theta, grads, None, states[k], step)
            proposals.append(proposal)
        theta = {n: sum(p[k] * proposals[k][n] for k in range(3)) for n in theta}
        theta = {n: t.detach() for n, t in theta.items()}
        assert_params_close(ours[step + 1], theta, 1e-12)
    momentum_alone = proposals[1]["body.1.weight"]
    assert not torch.allclose(momentum_alone, ours[3]["body.1.weight"])  # not vacuous


def test_gumbel_draws_one_member_per_task_with_the_logits_probabilities(float64) -> None:
    c = build(compose_config("update=space", *TINY))
    space = space_of(c)
    with torch.no_grad():
        space.logits.copy_(torch.log(torch.tensor([0.2, 0.3, 0.5])))
    keys = task_keys(0, "train", 0, 0, 4000)
    draws = torch.vmap(lambda key: space.weights(TaskRandom(key)), randomness="error")(keys)
    assert set(draws.sum(1).tolist()) == {1.0} and set(draws.flatten().tolist()) == {0.0, 1.0}
    frequency = draws.mean(0)
    # within 4 standard errors of the probabilities (n = 4000)
    for f, q in zip(frequency.tolist(), [0.2, 0.3, 0.5], strict=True):
        assert abs(f - q) < 4 * math.sqrt(q * (1 - q) / 4000)
    # a task's draw is its own: the same key gives the same member in a loop
    again = torch.stack([space.weights(TaskRandom(k)) for k in keys[:50]])
    assert torch.equal(again, draws[:50])


def test_gumbel_gradient_reaches_the_logits_straight_through(float64) -> None:
    """d loss / d logits = J_softmax((z + G) / T)^T d loss / d w, with G the task's draw:
    the softmax's Jacobian written out here, d loss / d w taken from the weights' tensor."""
    c = build(
        compose_config("update=space", *TINY, "algo.space_temperature=0.7", "algo.batching=loop")
    )
    space, algorithm = space_of(c), adaptive(c)
    seen: list[Tensor] = []
    original = space.weights

    def recording(rng: TaskRandom) -> Tensor:
        w = original(rng)
        w.retain_grad()
        seen.append(w)
        return w

    space.weights = recording  # type: ignore[method-assign]
    batch = sample(c)[:1]
    loss = algorithm.meta_loss(batch).loss
    loss.backward()
    assert len(seen) == 1
    w = seen[0]
    assert w.grad is not None and w.grad.abs().sum() > 0
    noise = TaskRandom(batch.keys[0]).gumbel((3,), torch.float64)
    soft = torch.softmax((space.logits.detach() + noise) / 0.7, 0)
    jacobian = (torch.diag(soft) - soft[:, None] * soft[None, :]) / 0.7
    assert space.logits.grad is not None
    torch.testing.assert_close(space.logits.grad, jacobian.T @ w.grad, rtol=1e-10, atol=1e-14)


def test_each_member_logs_what_it_learned_and_the_space_its_distribution() -> None:
    c = build(compose_config("update=space", *TINY, "algo.adam_lr=0.01"))
    scalars = c.algorithm.scalars()
    assert scalars["space_p_sgd"] == pytest.approx(1 / 3)
    assert scalars["momentum"] == pytest.approx(0.9) and scalars["adam_beta2"] == pytest.approx(
        0.999
    )
    assert scalars["adam_inner_lr_mean"] == pytest.approx(0.01)
    assert scalars["sgd_inner_lr_mean"] == pytest.approx(c.cfg.algo.inner_lr)
    out = c.algorithm.meta_loss(sample(c))
    chosen = [out.terms[f"space_chose_{m}"].item() for m in ("sgd", "momentum", "adam")]
    assert sum(chosen) == pytest.approx(1.0) and all(4 * v == round(4 * v) for v in chosen)
    groups = c.algorithm.param_groups()
    assert {id(p) for p in groups["update"]} == {id(p) for p in space_of(c).parameters()}


def test_space_settings_are_checked_and_the_effective_ones_recorded() -> None:
    bad = {
        "algo.space=[]": r"algo\.space",
        "algo.space=[sgd,sgd]": r"algo\.space",
        "algo.space=[sgd,space]": r"algo\.space",
        "algo.space=[sgd,adamw]": r"algo\.space: 'adamw' is not an option",
        "algo.space_sampling=soft": r"algo\.space_sampling",
        "algo.space_temperature=0": r"algo\.space_temperature",
        "algo.space_test=mean": r"algo\.space_test",
        "algo.adam_betas=[0.9,1.0]": r"algo\.adam_betas",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            build(compose_config("update=space", override, "device=cpu"))
    c = build(compose_config("update=space", "algo.space=[sgd,alfa]", *TINY))
    assert c.cfg.algo.space == ["sgd", "alfa"] and "alfa_weight_decay" in c.cfg.algo
    assert not c.algorithm.exact_gradient  # straight-through (and alfa's detached inputs)
    out = c.algorithm.meta_loss(sample(c))
    assert "alfa_alpha_hat_step0" in out.terms  # a member's own terms, under its name
    with pytest.raises(ConfigError, match=r"algo=reptile cannot learn"):
        build(compose_config("algo=reptile", "update=space", "device=cpu"))


def test_evaluation_picks_members_as_space_test_says(float64) -> None:
    common = (*TINY, "algo.adam_lr=0.02", "algo.test_inner_steps=3")
    c = build(compose_config("update=space", "algo.space_learn_hparams=false", *common))
    space = space_of(c)
    with torch.no_grad():
        space.logits.copy_(torch.tensor([0.0, 0.0, 2.0]))

    def members_drawn() -> set[int]:
        return {int(space.weights(TaskRandom(torch.tensor(k))).argmax()) for k in range(40)}

    c.algorithm.eval()
    assert members_drawn() == {0, 1, 2}  # null: as in training, a draw per task
    rng = TaskRandom(torch.tensor(3))
    space.cfg.space_test = "expectation"
    torch.testing.assert_close(space.weights(rng), torch.softmax(space.logits.detach(), 0))
    space.cfg.space_test = "argmax"
    assert space.weights(rng).tolist() == [0.0, 0.0, 1.0]
    c.algorithm.train()
    assert members_drawn() == {0, 1, 2}  # training still draws
    # argmax at evaluation: the meta-test of the most probable member alone
    adam = build(compose_config("update=adam", *common))
    adam.model.load_state_dict(c.model.state_dict())
    c.algorithm.eval()
    adam.algorithm.eval()
    batch = sample(c)
    ours, theirs = c.algorithm.evaluate(batch), adam.algorithm.evaluate(batch)
    assert torch.equal(ours.loss, theirs.loss) and ours.loss.shape == (4, 4)
