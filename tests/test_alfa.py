"""ALFA: with the generator's output fixed it is MAML with per-layer per-step rates; its
input statistics by hand; batch norm out of the inner loop; the random initialisation is
never updated."""

from __future__ import annotations

import pytest
import torch

from metacli.algorithms.alfa import ALFA
from metacli.build import build
from metacli.loop import meta_step, sample
from metacli.updates.alfa import ALFARule, task_state
from metacli.updates.base import slot
from metacli.updates.lslr import LSLRRule
from tests.conftest import compose_config

TINY = ("task=sinusoid", "device=cpu", "model.hidden=[5,4]", "train.meta_batch_size=3")


def test_task_state_is_the_mean_of_each_tensor_then_of_each_gradient() -> None:
    params = {"a": torch.tensor([[1.0, 2.0], [3.0, 6.0]]), "b": torch.tensor([-1.0, 4.0, 0.0])}
    grads = {"a": torch.tensor([[0.5, 0.5], [0.0, 1.0]]), "b": torch.tensor([3.0, 0.0, 0.0])}
    assert task_state(params, grads).tolist() == [3.0, 1.0, 0.5, 1.0]
    grads = {n: g.requires_grad_() for n, g in grads.items()}
    assert not task_state(params, grads).requires_grad  # the gradients enter detached


def test_with_the_generator_fixed_alfa_is_maml_with_per_layer_per_step_rates(float64) -> None:
    alfa = build(compose_config("algo=alfa", *TINY, "algo.inner_steps=3"))
    lslr = build(compose_config("algo=maml", "algo.update=lslr", *TINY, "algo.inner_steps=3"))
    lslr.algorithm.model.load_state_dict(alfa.algorithm.model.state_dict())
    rule, reference = alfa.algorithm.rule, lslr.algorithm.rule
    assert isinstance(rule, ALFARule) and isinstance(reference, LSLRRule)
    layers = len(rule.names)
    with torch.no_grad():
        last = rule.generator[2]
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.ones(layers), torch.zeros(layers)]))  # 1, then 0
        for k, name in enumerate(rule.names):  # distinct rates, shared by both
            rates = 0.01 * (1 + k) * torch.arange(1.0, 5.0)
            rule.alpha[slot(name)].copy_(rates)
            reference.learning_rates[slot(name)].copy_(rates[:3])
    batch = sample(alfa)
    ours, theirs = alfa.algorithm.meta_loss(batch), lslr.algorithm.meta_loss(batch)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-13)
    # the generated multipliers are logged per step: here exactly 1 and 0
    assert {k: v.item() for k, v in ours.terms.items()} == {
        **{f"alpha_hat_step{j}": 1.0 for j in range(3)},
        **{f"beta_hat_step{j}": 0.0 for j in range(3)},
    }
    init = list(alfa.algorithm.model.parameters())
    alphas = [rule.alpha[slot(n)] for n in rule.names]
    got = torch.autograd.grad(ours.loss, init + alphas)
    expected = torch.autograd.grad(
        theirs.loss,
        list(lslr.algorithm.model.parameters())
        + [reference.learning_rates[slot(n)] for n in rule.names],
    )
    for a, b in zip(got[: len(init)], expected[: len(init)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    for a, b in zip(got[len(init) :], expected[len(init) :], strict=True):
        torch.testing.assert_close(a[:3], b, rtol=1e-11, atol=1e-14)  # step 4 is unused
        assert a[3] == 0


def test_batch_norm_stays_out_of_the_inner_loop_unless_asked() -> None:
    conv = ("task=synthetic", "model=conv4", "model.filters=4", "task.image_size=16")
    algorithm = build(compose_config("algo=alfa", *conv)).algorithm
    assert isinstance(algorithm, ALFA)
    adapted = algorithm.adapted_names()
    assert adapted and not any(".norm." in n for n in adapted)
    assert any(".norm." in n for n, _ in algorithm.model.named_parameters())
    adapting = build(compose_config("algo=alfa", *conv, "algo.adapt_norm=true")).algorithm
    assert len(adapting.adapted_names()) == len(list(adapting.model.parameters()))


def test_random_initialisation_is_never_updated() -> None:
    c = build(compose_config("algo=alfa", "algo.init=random", *TINY))
    assert "model" not in {g["name"] for g in c.optimizer.param_groups}
    before = {n: p.detach().clone() for n, p in c.algorithm.named_parameters()}
    for _ in range(3):
        assert not isinstance(meta_step(c, None), str)
    for name, p in c.algorithm.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed != name.startswith("model."), name  # only the rule's parameters move
        assert name.startswith("model.") == (p.grad is None and not p.requires_grad)
    rule = c.algorithm.rule
    assert isinstance(rule, ALFARule) and rule.random_init
    betas = [p for n, p in before.items() if n.startswith("rule.beta.")]
    assert len(betas) == len(rule.names)  # per layer and step, starting at 1 here
    assert all(torch.equal(b, torch.ones_like(b)) for b in betas)
