"""Meta-regularization: MR-MAML's KL terms and its reduction to MAML on the head, the
parameter regularizers (path norm against a brute-force sum over paths, gradients against
finite differences), the optimizer settings of the notebook presets, and the hybrid's
lam = inf limit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from metacli.algorithms.mrmaml import MRMAML, gaussian_kl
from metacli.build import Components, build
from metacli.errors import ConfigError
from metacli.loop import meta_step, sample
from metacli.models.mlp import MLP, MLPConfig
from metacli.regularizers import l2
from metacli.tasks.base import TaskBatch
from tests.conftest import compose_config

SINE = ("task=sinusoid_nonexclusive", "device=cpu", "train.meta_batch_size=3")


def mrmaml(*overrides: str) -> tuple[MRMAML, TaskBatch]:
    """An MR-MAML and a meta-batch of three tasks of the notebook's sinusoid."""
    c = build(compose_config("algo=mrmaml", *SINE, *overrides))
    assert isinstance(c.algorithm, MRMAML)
    return c.algorithm, sample(c)


# --- KL terms ------------------------------------------------------------------------------
def test_gaussian_kl_equals_the_closed_form(float64) -> None:
    mu = torch.tensor([0.0, 0.5, -1.2, 2.0])
    sigma = torch.tensor([1.0, 2.0, 0.3, 1e-3])
    # KL(N(mu, s^2) || N(0, 1)) = log(1/s) + (s^2 + mu^2)/2 - 1/2, by hand for the second:
    assert gaussian_kl(mu, sigma)[1].item() == pytest.approx(-math.log(2) + 4.25 / 2 - 0.5)
    expected = torch.log(1 / sigma) + (sigma**2 + mu**2) / 2 - 0.5
    torch.testing.assert_close(gaussian_kl(mu, sigma), expected, rtol=1e-12, atol=1e-12)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(gaussian_kl(mu, sigma), reference, rtol=1e-12, atol=1e-12)
    # the notebook's floor: variances sigma^2 + 1e-16 and 1 + 1e-16
    floored = gaussian_kl(mu, sigma, 1e-16)
    var_q, var_p = sigma**2 + 1e-16, 1 + 1e-16
    notebook = 0.5 * (math.log(var_p) - torch.log(var_q) - 1 + var_q / var_p + mu**2 / var_p)
    torch.testing.assert_close(floored, notebook, rtol=1e-12, atol=1e-12)


def test_weight_kl_sums_the_closed_form_over_every_kernel_element(float64) -> None:
    algorithm, batch = mrmaml("algo.init_scale=-1.0")
    enc = algorithm.encoder_params()
    total = 0.0
    for name, mean in enc.items():
        if name.startswith("w"):
            sigma = 1.1920929e-07 + torch.log1p(torch.exp(enc["rho" + name[1:]]))
            total += (torch.log(1 / sigma) + (sigma**2 + mean**2) / 2 - 0.5).sum().item()
    assert algorithm.encoder.weight_kl(enc).item() == pytest.approx(total, rel=1e-12)
    out = algorithm.meta_loss(batch)
    beta = algorithm.cfg.beta
    assert out.terms["kl"].item() == pytest.approx(total, rel=1e-12)
    assert out.loss.item() == pytest.approx(out.terms["query_loss"].item() + beta * total)


def test_activation_kl_is_the_mean_over_dimensions_and_query_examples(float64) -> None:
    algorithm, _ = mrmaml("algo.variant=activations", "algo.encoder=[7]")
    enc = algorithm.encoder_params()
    x = torch.randn(6, 21)
    h = torch.relu(x @ enc["w0"].T + enc["b0"])
    mu = h @ enc["mu_w"].T + enc["mu_b"]
    sigma = nn.functional.softplus(h @ enc["sigma_w"].T + enc["sigma_b"])
    expected = (torch.log(1 / sigma) + (sigma**2 + mu**2) / 2 - 0.5).mean()
    z, kl = algorithm.encoder.encode(enc, x, None)
    torch.testing.assert_close(z, mu)
    assert kl is not None and kl.item() == pytest.approx(expected.item(), rel=1e-9)


# --- MR-MAML with beta = 0 and no noise is MAML on the head --------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_mrmaml_without_kl_and_noise_equals_head_only_maml_written_as_a_loop(
    float64, batching: str
) -> None:
    c = build(
        compose_config(
            "algo=mrmaml",
            *SINE,
            "algo.beta=0",
            "algo.scale_floor=0",
            "algo.init_scale=-1e4",  # softplus(-1e4) = 0: the posterior is its mean
            "algo.inner_steps=2",
            "algo.inner_lr=0.05",
            f"algo.batching={batching}",
        )
    )
    algorithm = c.algorithm
    assert isinstance(algorithm, MRMAML)
    batch = sample(c)
    enc, head = algorithm.encoder_params(), dict(algorithm.model.named_parameters())
    theirs = torch.zeros(())
    for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):

        def encode(x: Tensor) -> Tensor:
            return torch.relu(x @ enc["w0"].T + enc["b0"]) @ enc["w1"].T + enc["b1"]

        def net(p: dict[str, Tensor], z: Tensor) -> Tensor:
            z = torch.relu(z @ p["body.1.weight"].T + p["body.1.bias"])
            z = torch.relu(z @ p["body.3.weight"].T + p["body.3.bias"])
            return z @ p["head.weight"].T + p["head.bias"]

        fast = dict(head)
        for _ in range(2):
            loss = ((net(fast, encode(sx)) - sy) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - 0.05 * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        theirs = theirs + ((net(fast, encode(qx)) - qy) ** 2).mean() / len(batch)
    params = list(algorithm.parameters())
    expected = torch.autograd.grad(theirs, params, allow_unused=True, materialize_grads=True)
    ours = algorithm.meta_loss(batch)
    got = torch.autograd.grad(ours.loss, params, allow_unused=True, materialize_grads=True)
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert sum(g.norm() for g in expected) > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_visible_scale_makes_tasks_draw_their_own_encoder_weights(float64) -> None:
    noisy, batch = mrmaml("algo.init_scale=0")  # sigma = softplus(0) ~ 0.69
    first = noisy.meta_loss(batch).loss.item()
    assert noisy.meta_loss(batch).loss.item() == first  # the task's stream, not torch's
    mean, _ = mrmaml("algo.init_scale=0", "algo.test_encoder=mean")
    mean.load_state_dict(noisy.state_dict())
    sampled, averaged = noisy.evaluate(batch).loss, mean.evaluate(batch).loss
    assert not torch.equal(sampled, averaged)


# --- parameter regularizers ----------------------------------------------------------------
def brute_force_path_norm(weights: list[Tensor], biases: list[Tensor]) -> float:
    """Sum over every path to an output, starting at an input or at a bias unit, of the
    product of its squared weights (the bias squared for a path starting there)."""
    last = len(weights) - 1

    def onward(layer: int, unit: int, product: float) -> float:
        """Paths continuing from output ``unit`` of linear layer ``layer``."""
        if layer == last:
            return product
        following = weights[layer + 1]
        return sum(
            onward(layer + 1, nxt, product * following[nxt, unit].item() ** 2)
            for nxt in range(following.shape[0])
        )

    total = 0.0
    for unit, source in itertools.product(range(weights[0].shape[0]), range(weights[0].shape[1])):
        total += onward(0, unit, weights[0][unit, source].item() ** 2)
    for layer, bias in enumerate(biases):
        total += sum(onward(layer, unit, bias[unit].item() ** 2) for unit in range(len(bias)))
    return total


def test_path_norm_of_a_tiny_network_equals_the_sum_over_its_paths(float64) -> None:
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=[3, 2]), (2,), 2).double()
    params = dict(model.named_parameters())
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected = brute_force_path_norm([m.weight for m in linear], [m.bias for m in linear])
    assert model.squared_path_norm(params).item() == pytest.approx(expected, rel=1e-12)
    # invariant under a ReLU rescaling (unit 0 of the first layer times 3, its outputs / 3)
    scaled = {n: p.detach().clone() for n, p in params.items()}
    scaled["body.1.weight"][0] *= 3
    scaled["body.1.bias"][0] *= 3
    scaled["body.3.weight"][:, 0] /= 3
    x = torch.randn(5, 2)
    outputs = torch.func.functional_call(model, scaled, (x,))
    torch.testing.assert_close(outputs, model(x))
    with_bias_paths = model.squared_path_norm(scaled).item()
    assert with_bias_paths == pytest.approx(expected, rel=1e-12)
    assert l2(scaled).item() != pytest.approx(l2(params).item())


@pytest.mark.parametrize("kind", ["l2", "path"])
def test_regularizer_gradient_matches_finite_differences(float64, kind: str) -> None:
    c = build(
        compose_config(
            "algo=metasgd",  # learned rates too: they must be left alone
            "task=sinusoid",
            "device=cpu",
            "model.hidden=[4,3]",
            "train.meta_batch_size=2",
            f"algo.regularizer={kind}",
            "algo.regularizer_weight=0.3",
        )
    )
    algorithm = c.algorithm
    penalty = algorithm.penalty()
    assert penalty is not None
    model_params = list(algorithm.model.parameters())
    rates = list(algorithm.rule.parameters())
    grads = torch.autograd.grad(penalty, model_params + rates, allow_unused=True)
    assert all(g is None for g in grads[len(model_params) :])  # never on learned rates
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(model_params, grads, strict=False):
            flat, numeric = p.view(-1), torch.zeros(p.numel(), dtype=p.dtype)
            for j in range(flat.numel()):
                keep = flat[j].item()
                flat[j] = keep + eps
                plus = algorithm.penalty().item()  # type: ignore[union-attr]
                flat[j] = keep - eps
                minus = algorithm.penalty().item()  # type: ignore[union-attr]
                flat[j] = keep
                numeric[j] = (plus - minus) / (2 * eps)
            assert g is not None
            torch.testing.assert_close(g.reshape(-1), numeric, rtol=1e-6, atol=1e-9)
    # the objective adds it to the meta-loss, and logs both terms
    batch = sample(c)
    out, plain = algorithm.objective(batch), algorithm.meta_loss(batch)
    assert out.terms["meta_loss"].item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert out.terms["regularizer"].item() == pytest.approx(penalty.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx(plain.loss.item() + penalty.item(), rel=1e-12)
    if kind == "l2":
        assert penalty.item() == pytest.approx(
            0.3 * sum(p.pow(2).sum().item() for p in model_params)
        )


def test_the_path_regularizer_needs_a_fully_connected_model() -> None:
    with pytest.raises(ConfigError, match=r"algo\.regularizer=path is defined for fully connected"):
        build(compose_config("algo=maml", "task=synthetic", "model=conv4", "algo.regularizer=path"))


def test_a_regularized_meta_step_logs_both_terms() -> None:
    c = build(
        compose_config(
            "algo=maml",
            "task=sinusoid",
            "device=cpu",
            "algo.regularizer=l2",
            "algo.regularizer_weight=0.01",
            "train.meta_batch_size=2",
        )
    )
    out = meta_step(c, None)
    assert not isinstance(out, str)
    assert set(out.terms) == {"meta_loss", "regularizer"}
    assert out.loss.item() == pytest.approx(
        out.terms["meta_loss"].item() + out.terms["regularizer"].item(), rel=1e-6
    )


# --- the notebook's optimizer: a new Adam every iteration, for chosen groups -------------
def test_fresh_state_steps_like_a_new_adam_every_iteration_for_its_groups_only(float64) -> None:
    c = build(
        compose_config(
            "algo=mrmaml",
            *SINE,
            "algo.variant=activations",
            "optim.eps=1e-7",
            "optim.groups.encoder.fresh_state=true",
        )
    )
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in c.algorithm.named_parameters()}
        batch = sample(c)
        c.optimizer.zero_grad()
        c.algorithm.objective(batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in c.algorithm.named_parameters()}
        meta_step_on(c, batch)
        for name, p in c.algorithm.encoder.named_parameters():  # a first Adam step
            g = grads[f"encoder.{name}"]
            expected = before[f"encoder.{name}"] - 1e-3 * g / (g.abs() + 1e-7)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-14)
    state = c.optimizer.state  # the head's Adam kept its moments
    assert {int(state[p]["step"]) for p in c.algorithm.model.parameters()} == {3}
    assert {int(state[p]["step"]) for p in c.algorithm.encoder.parameters()} == {1}


def meta_step_on(c: Components, batch: TaskBatch) -> None:
    """One outer step of the loop on a given batch."""
    import metacli.loop as loop

    original = loop.sample
    loop.sample = lambda _c: batch  # type: ignore[assignment]
    try:
        assert not isinstance(meta_step(c, None), str)
    finally:
        loop.sample = original


def test_glorot_init_is_keras_dense_default() -> None:
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=[40, 40], init="glorot"), (21,), 1)
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound  # uniform on the whole interval
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


# --- the hybrid's limit ----------------------------------------------------------------------
def test_hybrid_with_infinite_lam_is_maml(float64) -> None:
    common = ("task=sinusoid", "device=cpu", "train.meta_batch_size=3", "algo.inner_steps=2")
    hybrid = build(compose_config("algo=hybrid", "algo.lam=inf", *common))
    maml = build(compose_config("algo=maml", *common))
    maml.algorithm.load_state_dict(hybrid.algorithm.state_dict())
    batch = sample(hybrid)
    ours, theirs = hybrid.algorithm.meta_loss(batch), maml.algorithm.meta_loss(batch)
    a = torch.autograd.grad(ours.loss, list(hybrid.algorithm.parameters()))
    b = torch.autograd.grad(theirs.loss, list(maml.algorithm.parameters()))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert set(ours.terms) == {"task_loss", "maml_loss"}
