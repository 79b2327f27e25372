"""The LSTM meta-learner: its preprocessing by hand, its reduction to SGD with fixed gates,
and its meta-gradient against a plain per-task loop written here with torch's own LSTM cell."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from metacli.algorithms.metalstm import MetaLSTM
from metacli.build import Components, build
from metacli.loop import sample
from metacli.updates.metalstm import MetaLSTMRule, preprocess
from tests.conftest import compose_config

TINY = ("task=sinusoid", "device=cpu", "model.hidden=[3]", "train.meta_batch_size=2")


def metalstm(*overrides: str) -> Components:
    c = build(compose_config("algo=metalstm", *TINY, *overrides))
    assert isinstance(c.algorithm, MetaLSTM)
    return c


def test_preprocessing_against_hand_computed_values(float64) -> None:
    p = 10.0
    x = torch.tensor([1.0, -math.exp(-2), math.exp(-12), -3e-5, 0.0, math.exp(-10)])
    expected = torch.tensor(
        [
            [0.0, 1.0],  # log 1 / 10, sign
            [-0.2, -1.0],  # log e^-2 / 10
            [-1.0, math.exp(-2)],  # below e^-10: (-1, e^10 x)
            [-1.0, -3e-5 * 22026.465794806718],  # 3e-5 < e^-10 = 4.54e-5: (-1, e^10 x)
            [-1.0, 0.0],
            [-1.0, 1.0],  # exactly e^-10: the log branch (>=), log e^-10 / 10 = -1
        ]
    )
    torch.testing.assert_close(preprocess(x, p), expected, rtol=1e-12, atol=1e-12)


def fix_gates(rule: MetaLSTMRule, alpha: float) -> None:
    """forget = sigmoid(40) = 1.0 and input = sigmoid(logit(alpha)) = alpha, whatever h is."""
    with torch.no_grad():
        rule.forget_weight.zero_()
        rule.input_weight.zero_()
        rule.forget_bias.fill_(40.0)
        rule.input_bias.fill_(math.log(alpha / (1 - alpha)))


def test_with_fixed_gates_the_update_is_sgd(float64) -> None:
    c = metalstm("algo.inner_steps=4", "algo.test_inner_steps=4")
    sgd = build(
        compose_config(
            "algo=maml",
            *TINY,
            "algo.inner_lr=0.3",
            "algo.inner_steps=4",
            "algo.test_inner_steps=4",
            "algo.first_order=true",
        )
    )
    sgd.algorithm.model.load_state_dict(c.algorithm.model.state_dict())
    assert torch.sigmoid(torch.tensor(40.0)).item() == 1.0
    fix_gates(c.algorithm.rule, 0.3)
    batch = sample(c)
    ours, theirs = c.algorithm.evaluate(batch), sgd.algorithm.evaluate(batch)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-12, atol=1e-15)  # alpha to 1 ulp
    assert not torch.allclose(ours.loss[:, 0], ours.loss[:, -1])  # it adapted
    # and the meta-loss and its gradient for the initialisation (first order, as the paper)
    a, b = c.algorithm.meta_loss(batch), sgd.algorithm.meta_loss(batch)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-13)
    assert a.terms["forget_gate"].item() == 1.0  # the logged mean gates
    assert a.terms["input_gate"].item() == pytest.approx(0.3, rel=1e-12)
    ga = torch.autograd.grad(a.loss, list(c.algorithm.model.parameters()))
    gb = torch.autograd.grad(b.loss, list(sgd.algorithm.model.parameters()))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-14)


def test_meta_gradient_equals_a_plain_loop_with_torchs_lstm_cell(float64) -> None:
    c = metalstm(
        "algo.inner_steps=3",
        "algo.lstm_hidden=4",
        "algo.inner_batch_size=4",
        "algo.gradient_divisor=4",  # the authors' learner: grad / batch size
    )
    algorithm = c.algorithm
    rule = algorithm.rule
    assert isinstance(rule, MetaLSTMRule)
    with torch.no_grad():  # gates away from their start, so every path matters
        for p in rule.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = sample(c)
    model = algorithm.model
    cell = nn.LSTMCell(4, 4).double()
    rule_weights = {
        "weight_ih": rule.lstm_in,
        "weight_hh": rule.lstm_hh,
        "bias_ih": rule.lstm_bias,
        "bias_hh": torch.zeros(16, dtype=torch.float64),
    }

    def pre(x: Tensor) -> Tensor:
        big = x.abs() >= math.exp(-10)
        a = torch.where(big, torch.log(x.abs().clamp_min(1e-300)) / 10, -1.0)
        return torch.stack([a, torch.where(big, torch.sign(x), math.exp(10) * x)], -1)

    total = torch.zeros((), dtype=torch.float64)
    for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):
        theta = torch.cat([p.reshape(-1) for p in model.parameters()])
        count = len(theta)
        h = torch.zeros(count, 4, dtype=torch.float64)
        cc, f, i = h.clone(), h[:, 0].clone(), h[:, 0].clone()
        for step in range(3):
            lo = (step % 3) * 4  # 10 support points in batches of 4: 0-3, 4-7, 8-9
            x, y = sx[lo : lo + 4], sy[lo : lo + 4]
            leaf = theta.detach().requires_grad_()  # gradient and loss are constants
            shaped, at = {}, 0
            for n, p in model.named_parameters():
                shaped[n] = leaf[at : at + p.numel()].reshape(p.shape)
                at += p.numel()
            loss = ((torch.func.functional_call(model, shaped, (x,)) - y) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, leaf)
            grad = grad / 4
            inputs = torch.cat([pre(loss.detach()).expand(count, 2), pre(grad)], 1)
            h, cc = torch.func.functional_call(cell, rule_weights, (inputs, (h, cc)))
            f = (
                torch.cat([h, theta[:, None], f[:, None]], 1) @ rule.forget_weight
                + rule.forget_bias
            )
            i = torch.cat([h, theta[:, None], i[:, None]], 1) @ rule.input_weight + rule.input_bias
            theta = torch.sigmoid(f) * theta - torch.sigmoid(i) * grad
        final, at = {}, 0
        for n, p in model.named_parameters():
            final[n] = theta[at : at + p.numel()].reshape(p.shape)
            at += p.numel()
        prediction = torch.func.functional_call(model, final, (qx,))
        total = total + ((prediction - qy) ** 2).mean() / len(batch)
    params = list(algorithm.parameters())
    expected = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
    ours = algorithm.meta_loss(batch)
    got = torch.autograd.grad(ours.loss, params, allow_unused=True, materialize_grads=True)
    assert ours.loss.item() == pytest.approx(total.item(), rel=1e-12)
    assert all(g.norm() > 0 for g in expected)  # every meta-parameter gets a gradient
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_initial_gate_biases_start_as_a_small_step_that_keeps_the_parameters() -> None:
    rule = metalstm().algorithm.rule
    assert isinstance(rule, MetaLSTMRule)
    assert 4 <= rule.forget_bias.item() <= 5 and -5 <= rule.input_bias.item() <= -4
    for weight in (rule.lstm_in, rule.lstm_hh, rule.lstm_bias, rule.forget_weight):
        assert weight.abs().max() <= 0.01
