"""Reptile as openai/supervised-reptile runs it, checked against that code's rules written
out by hand with torch.optim (float64): Adam with beta1 = 0 as ONE optimizer whose state
carries over from task to task, mini-batches cut from passes over a task's examples in
fresh random orders, non-transductive evaluation, and its Omniglot network's readout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metacli.algorithms.adaptive import minibatches
from metacli.algorithms.reptile import Reptile, ReptileConfig
from metacli.config import merged_schema
from metacli.errors import ConfigError
from metacli.models.conv4 import Conv4, Conv4Config
from metacli.streams import TaskRandom
from metacli.tasks.synthetic import Synthetic, SyntheticConfig
from metacli.updates.adam import AdamRuleConfig
from tests.test_algorithms import double

pytestmark = pytest.mark.usefixtures("float64")

LR, BATCH, STEPS = 0.001, 4, 3


def setup(
    carry: bool = True, batching: str = "loop", **algo: object
) -> tuple[Reptile, Conv4, Synthetic]:
    task = Synthetic(SyntheticConfig(ways=3, shots=1, queries=2, image_size=16, classes=12))
    torch.manual_seed(0)
    model = Conv4(Conv4Config(filters=4), task.input_shape, 3).double()
    schema = merged_schema("ReptileWithAdam", AdamRuleConfig, ReptileConfig)  # as build does
    cfg = schema(
        inner_lr=LR,
        inner_steps=STEPS,
        update="adam",
        adam_betas=[0.0, 0.999],
        inner_batch=BATCH,
        carry_state=carry,
        batching=batching,
        **algo,
    )
    return Reptile(cfg, model, task), model, task


def test_minibatches_are_passes_in_fresh_orders_cut_in_consecutive_batches() -> None:
    rng = TaskRandom(torch.tensor(7))
    order = minibatches(rng, examples=5, batch=3, steps=4)  # 12 draws: 3 passes, cut at 12
    assert order.shape == (4, 3)
    flat = order.flatten()
    for start in (0, 5):  # each whole pass is a permutation of the examples
        assert sorted(flat[start : start + 5].tolist()) == [0, 1, 2, 3, 4]
    assert len(set(flat[10:12].tolist())) == 2  # the third pass, begun
    again = minibatches(TaskRandom(torch.tensor(7)), 5, 3, 4)
    assert torch.equal(order, again)  # the task's stream decides it
    other = minibatches(TaskRandom(torch.tensor(8)), 5, 3, 4)
    assert not torch.equal(order, other)


def test_carried_adam_training_equals_one_torch_adam_across_tasks() -> None:
    """supervised-reptile's train_step: for each task, import theta, run the minimize op
    (one tf.train.AdamOptimizer for the whole run) on its mini-batches, export phi; then
    theta + eps * (mean(phi) - theta). Two meta-iterations, so the state carries twice."""
    algo, model, task = setup()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = Conv4(Conv4Config(filters=4), task.input_shape, 3).double()
    reference.load_state_dict(model.state_dict())
    adam = torch.optim.Adam(reference.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8)
    eps = 0.5
    for iteration in range(2):
        batch = double(task.sample(2, "train", torch.Generator().manual_seed(iteration)))
        batch = batch.with_keys(torch.tensor([11 + 2 * iteration, 12 + 2 * iteration]))
        # ours: the surrogate's gradient, applied with SGD at eps
        algo.zero_grad()
        algo.meta_loss(batch).loss.backward()
        with torch.no_grad():
            for p in algo.model.parameters():
                p -= eps * p.grad
        # the reference, by hand
        phis = []
        for i in range(2):
            x = torch.cat([batch.support_x[i], batch.query_x[i]])
            y = torch.cat([batch.support_y[i], batch.query_y[i]])
            order = minibatches(TaskRandom(batch.keys[i]), x.shape[0], BATCH, STEPS)
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    p.copy_(theta[n])
            for step in range(STEPS):
                adam.zero_grad()
                F.cross_entropy(reference(x[order[step]]), y[order[step]]).backward()
                adam.step()
            phis.append({n: p.detach().clone() for n, p in reference.named_parameters()})
        theta = {n: theta[n] + eps * (sum(phi[n] for phi in phis) / 2 - theta[n]) for n in theta}
        for n, p in algo.model.named_parameters():
            torch.testing.assert_close(p.detach(), theta[n], rtol=1e-7, atol=1e-9)
    # a fresh state per task is measurably another update (its first step is sign descent)
    carried, _, _ = setup()
    fresh, _, _ = setup(carry=False)
    batch = double(task.sample(2, "train", torch.Generator().manual_seed(0)))
    batch = batch.with_keys(torch.tensor([11, 12]))
    grads = []
    for candidate in (carried, fresh):
        candidate.meta_loss(batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in candidate.model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() > 1e-5
    # the carried second moments and step count are the reference optimizer's
    assert int(algo.carried.t) == 2 * 2 * STEPS
    for n, p in reference.named_parameters():
        carried = getattr(algo.carried, "v__" + n.replace(".", "__"))
        torch.testing.assert_close(carried, adam.state[p]["exp_avg_sq"], rtol=1e-9, atol=1e-15)


def test_evaluation_starts_each_task_from_the_carried_state_and_keeps_it() -> None:
    algo, _, task = setup()
    batch = double(task.sample(2, "train", torch.Generator().manual_seed(0)))
    algo.meta_loss(batch.with_keys(torch.tensor([1, 2])))  # some carried state
    before = {n: b.clone() for n, b in algo.carried.named_buffers()}
    test = double(task.sample(2, "test", torch.Generator().manual_seed(5)))
    test = test.with_keys(torch.tensor([3, 4]))
    evaluation = algo.evaluate(test)
    for n, b in algo.carried.named_buffers():
        assert torch.equal(b, before[n]), n  # evaluation leaves it as it was
    fresh, _, _ = setup(carry=False)
    fresh.model.load_state_dict(algo.model.state_dict())
    assert not torch.allclose(fresh.evaluate(test).loss[:, -1], evaluation.loss[:, -1])


def test_non_transductive_predictions_see_the_support_set_and_one_query() -> None:
    """supervised-reptile's _test_predictions without --transductive: for each query,
    run the network on train_set + (query,) and keep the last prediction."""
    algo, model, task = setup(carry=False, transductive=False)
    batch = double(task.sample(1, "test", torch.Generator().manual_seed(3)))
    sx, qx = batch.support_x[0], batch.query_x[0]
    params = dict(model.named_parameters())
    ours = algo.predict(params, qx, 0, sx)
    by_hand = torch.stack([model(torch.cat([sx, q[None]]))[-1] for q in qx])
    torch.testing.assert_close(ours, by_hand, rtol=1e-12, atol=1e-12)
    transductive, _, _ = setup(carry=False)
    assert not torch.allclose(transductive.predict(params, qx, 0, sx), ours)


def test_carry_state_needs_a_rule_with_state() -> None:
    task = Synthetic(SyntheticConfig(ways=3, shots=1, queries=2, image_size=16, classes=12))
    model = Conv4(Conv4Config(filters=4), task.input_shape, 3)
    with pytest.raises(ConfigError, match=r"algo\.carry_state"):
        Reptile(ReptileConfig(carry_state=True), model, task)


def test_reptile_networks_readout() -> None:
    """supervised-reptile's OmniglotModel flattens its four stride-2 'same' convolutions
    (28 -> 2, 2 x 2 x 64 = 256 features); its MiniImageNetModel pools with 'SAME'
    padding (84 -> 6: 6 x 6 x 32 = 1152), where MAML's 'VALID' pooling gives 5 x 5 x 32."""
    flat = Conv4(Conv4Config(strided=True, readout="flatten"), (1, 28, 28), 5)
    assert flat.feature_dim == 256 and flat.head is not None
    assert flat.head.in_features == 256
    assert Conv4(Conv4Config(strided=True), (1, 28, 28), 5).feature_dim == 64
    assert Conv4(Conv4Config(filters=32, pool_padding="same"), (3, 84, 84), 5).feature_dim == 1152
    assert Conv4(Conv4Config(filters=32), (3, 84, 84), 5).feature_dim == 800


@pytest.mark.parametrize("carry", [False, True])
def test_every_batching_strategy_gives_the_same_numbers(carry: bool) -> None:
    """Mini-batches drawn from each task's stream, the carried state and the
    non-transductive forward are the same under a loop, threads and vmap."""
    results = {}
    for batching in ("loop", "threads", "vmap"):
        algo, _, task = setup(carry, batching, transductive=False, test_inner_batch=2)
        batch = double(task.sample(3, "train", torch.Generator().manual_seed(4)))
        loss = algo.meta_loss(batch.with_keys(torch.tensor([5, 6, 7]))).loss
        grads = torch.autograd.grad(loss, list(algo.model.parameters()))
        test = double(task.sample(3, "test", torch.Generator().manual_seed(9)))
        evaluation = algo.evaluate(test.with_keys(torch.tensor([1, 2, 3])))
        results[batching] = (torch.cat([g.flatten() for g in grads]), evaluation.loss)
    for batching in ("threads", "vmap"):
        for ours, loop in zip(results[batching], results["loop"], strict=True):
            torch.testing.assert_close(ours, loop, rtol=1e-6, atol=1e-8)  # Adam: sign-like steps
