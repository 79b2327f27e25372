"""Each algorithm against an independent plain per-task loop reference (float64).

The references below use nn.Module calls, ``torch.autograd.grad`` and Python loops over
tasks and steps: the way a researcher writes the algorithm from the paper.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.algorithms.anil import ANIL, ANILConfig
from metacli.algorithms.boil import BOIL, BOILConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.algorithms.mamlpp import MAMLPP, MAMLPPConfig, msl_weights
from metacli.algorithms.metasgd import MetaSGD, MetaSGDConfig
from metacli.algorithms.pretrain import Pretrain, PretrainConfig
from metacli.algorithms.protonet import ProtoNet, ProtoNetConfig
from metacli.algorithms.reptile import Reptile, ReptileConfig
from metacli.build import build
from metacli.engine.inner import last
from metacli.errors import ConfigError
from metacli.evaluation import evaluate
from metacli.loop import meta_step
from metacli.models.conv4 import Conv4, Conv4Config
from metacli.models.mlp import MLP, MLPConfig
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch
from metacli.tasks.sinusoid import Sinusoid, SinusoidConfig
from metacli.tasks.synthetic import Synthetic, SyntheticConfig
from tests.conftest import compose_config

LR, STEPS = 0.1, 2


pytestmark = pytest.mark.usefixtures("float64")  # the float64 of tests/conftest.py


def double(batch: TaskBatch) -> TaskBatch:
    def cast(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    return TaskBatch(
        *(cast(t) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    )


def regression(tasks: int = 3) -> tuple[Sinusoid, MLP, TaskBatch]:
    task = Sinusoid(SinusoidConfig(shots=5, queries=6))
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=[12, 12], activation="tanh"), (1,), 1).double()
    return task, model, double(task.sample(tasks, "train", torch.Generator().manual_seed(1)))


def classification(
    norm: str = "transductive", head: bool = True, tasks: int = 3
) -> tuple[Synthetic, Conv4, TaskBatch]:
    task = Synthetic(SyntheticConfig(ways=3, shots=2, queries=2, image_size=16, classes=8))
    torch.manual_seed(0)
    model = Conv4(
        Conv4Config(filters=3, norm=norm, norm_steps=STEPS + 1),
        task.input_shape,
        3 if head else None,
    ).double()
    return task, model, double(task.sample(tasks, "train", torch.Generator().manual_seed(1)))


def grads_of(module: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_close_dicts(ours: dict[str, Tensor], reference: dict[str, Tensor], rel: float) -> None:
    assert ours.keys() == reference.keys()
    a = torch.cat([ours[k].flatten() for k in reference])
    b = torch.cat([reference[k].flatten() for k in reference])
    assert ((a - b).norm() / b.norm()).item() < rel


def reference_maml(
    model: nn.Module,
    batch: TaskBatch,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    adapted: list[str],
    lr: Callable[[str, int], Tensor | float],
    steps: int = STEPS,
    step_weights: list[float] | None = None,
    set_step: bool = False,
) -> Tensor:
    """Mean over tasks of the (weighted) query losses after the inner steps."""
    names = [n for n, _ in model.named_parameters()]
    total = torch.zeros(())
    for i in range(len(batch)):
        params = dict(model.named_parameters())
        task_loss = torch.zeros(())
        for step in range(steps):
            if set_step:
                model.set_step(step)
            out = torch.func.functional_call(model, params, (batch.support_x[i],))
            inner = loss_fn(out, batch.support_y[i])
            grads = torch.autograd.grad(inner, [params[n] for n in adapted], create_graph=True)
            for n, g in zip(adapted, grads, strict=True):
                params[n] = params[n] - lr(n, step) * g
            weight = 1.0 if step_weights is None else step_weights[step]
            if step_weights is not None or step == steps - 1:
                if set_step:  # the query sees the set of its step, as MAML++'s num_step
                    model.set_step(step)
                out = torch.func.functional_call(model, params, (batch.query_x[i],))
                task_loss = task_loss + weight * loss_fn(out, batch.query_y[i])
        total = total + task_loss
    assert names
    return total / len(batch)


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_anil_meta_gradient_and_frozen_body(batching: str) -> None:
    task, model, batch = regression()
    anil = ANIL(ANILConfig(inner_lr=LR, inner_steps=STEPS, batching=batching), model, task)
    ours = grads_of(model, anil.meta_loss(batch).loss)
    head = ["head.weight", "head.bias"]
    ref = grads_of(model, reference_maml(model, batch, F.mse_loss, head, lambda n, s: LR))
    assert_close_dicts(ours, ref, 1e-8)
    assert ours["body.1.weight"].abs().sum() > 0  # the body learns in the outer loop
    params = dict(model.named_parameters())
    rng = TaskRandom(torch.tensor(0))
    steps = anil.adapt(params, batch.support_x[0], batch.support_y[0], STEPS, LR, False, rng)
    adapted = last(steps).params
    for name, value in params.items():
        changed = not torch.equal(adapted[name], value)
        assert changed == (name in head), name


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_boil_meta_gradient_and_frozen_head(batching: str) -> None:
    """BOIL on a Conv-4 with batch norm: the body adapts, the head does not, and the
    meta-gradient (the head's included) is the reference's with the head's inner rate 0."""
    task, model, batch = classification()
    cfg = BOILConfig(inner_lr=LR, inner_steps=STEPS, batching=batching)
    boil = BOIL(cfg, model, task)
    ours = grads_of(model, boil.meta_loss(batch).loss)
    names = [n for n, _ in model.named_parameters()]
    body = [n for n in names if not n.startswith("head.")]
    ref = grads_of(model, reference_maml(model, batch, F.cross_entropy, body, lambda n, s: LR))
    assert_close_dicts(ours, ref, 1e-8)
    assert ours["head.weight"].abs().sum() > 0  # the head learns in the outer loop
    params = dict(model.named_parameters())
    rng = TaskRandom(torch.tensor(0))
    steps = boil.adapt(params, batch.support_x[0], batch.support_y[0], STEPS, LR, False, rng)
    adapted = last(steps).params
    for name, value in params.items():
        assert (not torch.equal(adapted[name], value)) == (name in body), name


@pytest.mark.parametrize(
    ("adapt", "adapt_norm", "expected"),
    [
        ("all", True, lambda n: True),
        ("head", True, lambda n: n.startswith("head.")),
        ("body", True, lambda n: not n.startswith("head.")),
        ("body", False, lambda n: not n.startswith("head.") and ".norm." not in n),
        (
            ["blocks.3.*", "head.bias"],
            True,
            lambda n: n.startswith("blocks.3.") or n == "head.bias",
        ),
    ],
)
def test_adapt_selects_the_inner_loop_parameters(adapt, adapt_norm, expected) -> None:  # type: ignore[no-untyped-def]
    """algo.adapt on MAML: the selected parameters move in the inner loop, the others
    do not, and the meta-gradient is the reference's adapting exactly those."""
    task, model, batch = classification(tasks=2)
    cfg = MAMLConfig(inner_lr=LR, inner_steps=STEPS, adapt=adapt, adapt_norm=adapt_norm)
    maml = MAML(cfg, model, task)
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if expected(n)]
    assert maml.adapted_names() == chosen
    ours = grads_of(model, maml.meta_loss(batch).loss)
    ref = grads_of(model, reference_maml(model, batch, F.cross_entropy, chosen, lambda n, s: LR))
    assert_close_dicts(ours, ref, 1e-8)


def test_adapt_rejects_what_selects_nothing() -> None:
    task, model, _ = classification()
    with pytest.raises(ConfigError, match=r"matches none of the parameters of model=conv4: "):
        MAML(MAMLConfig(adapt=["encoder.*"]), model, task)
    task, headless, _ = classification(head=False)
    with pytest.raises(ConfigError, match=r"algo\.adapt=body splits the model at its linear head"):
        MAML(MAMLConfig(adapt="body"), headless, task)
    for bad in ("bodies", []):
        with pytest.raises(ConfigError, match=r"algo\.adapt"):
            MAMLConfig(adapt=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_metasgd_meta_gradient_reaches_the_learned_rates(batching: str) -> None:
    task, model, batch = regression()
    metasgd = MetaSGD(MetaSGDConfig(inner_lr=LR, inner_steps=STEPS, batching=batching), model, task)
    with torch.no_grad():  # distinct rates per element, so a mix-up would show
        for rates in metasgd.learned_rates().values():
            rates.uniform_(0.05, 0.15)
    ours = grads_of(metasgd, metasgd.meta_loss(batch).loss)
    names = [n for n, _ in model.named_parameters()]
    rates = metasgd.learned_rates()
    loss = reference_maml(model, batch, F.mse_loss, names, lambda n, s: rates[n])
    ref = grads_of(metasgd, loss)
    assert_close_dicts(ours, ref, 1e-8)
    assert all(ours[f"rule.learning_rates.{n.replace('.', '__')}"].abs().sum() > 0 for n in names)


def test_mamlpp_with_every_trick_off_equals_maml() -> None:
    task, model, batch = classification()
    off = MAMLPPConfig(
        inner_lr=LR,
        inner_steps=STEPS,
        update="sgd",
        multi_step_loss=False,
        first_order_iterations=0,
        per_step_bn=False,
        cosine_outer_lr=False,
        adapt_norm=True,
    )
    mamlpp = MAMLPP(off, model, task)
    maml = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS), model, task)
    assert_close_dicts(
        grads_of(model, mamlpp.meta_loss(batch).loss),
        grads_of(model, maml.meta_loss(batch).loss),
        1e-12,
    )


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_mamlpp_tricks_match_reference(batching: str) -> None:
    task, model, batch = classification(norm="per_step")
    cfg = MAMLPPConfig(inner_lr=LR, inner_steps=STEPS, msl_iterations=100, batching=batching)
    mamlpp = MAMLPP(cfg, model, task)
    mamlpp.outer_steps.fill_(30)
    with torch.no_grad():
        for rates in mamlpp.learned_rates().values():
            rates.uniform_(0.05, 0.15)
    ours = grads_of(mamlpp, mamlpp.meta_loss(batch).loss)
    weights = msl_weights(STEPS, 30, 100)
    assert 0 < weights[0] < weights[-1] and abs(sum(weights) - 1) < 1e-12
    names = [n for n, _ in model.named_parameters() if ".norm." not in n]  # not adapted
    lrs = mamlpp.learned_rates()
    loss = reference_maml(
        model,
        batch,
        F.cross_entropy,
        names,
        lambda n, s: lrs[n][s],
        step_weights=weights,
        set_step=True,
    )
    assert_close_dicts(ours, grads_of(mamlpp, loss), 1e-8)
    # Per-step batch norm: step 1's affine parameters receive their own gradient.
    assert ours["model.blocks.0.norm.weight"][1].abs().sum() > 0


def test_mamlpp_derivative_order_annealing_and_schedule() -> None:
    task, model, batch = regression()
    cfg = MAMLPPConfig(
        inner_lr=LR,
        inner_steps=STEPS,
        first_order_iterations=10,
        multi_step_loss=False,
        update="sgd",
    )
    mamlpp = MAMLPP(cfg, model, task)
    first = grads_of(model, mamlpp.meta_loss(batch).loss)
    mamlpp.outer_steps.fill_(10)
    second = grads_of(model, mamlpp.meta_loss(batch).loss)
    maml = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS), model, task)
    fomaml = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS, first_order=True), model, task)
    assert_close_dicts(first, grads_of(model, fomaml.meta_loss(batch).loss), 1e-12)
    assert_close_dicts(second, grads_of(model, maml.meta_loss(batch).loss), 1e-12)
    assert msl_weights(4, 0, 100) == [0.25] * 4
    assert msl_weights(4, 100, 100) == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_protonet_logits_are_minus_squared_distances_to_class_means(batching: str) -> None:
    task, model, batch = classification(head=False)
    protonet = ProtoNet(ProtoNetConfig(batching=batching), model, task)
    ours = grads_of(protonet, protonet.meta_loss(batch).loss)
    total = torch.zeros(())
    for i in range(len(batch)):
        embedded = model(torch.cat([batch.support_x[i], batch.query_x[i]]))
        support, query = embedded[:6], embedded[6:]
        means = torch.stack([support[batch.support_y[i] == c].mean(0) for c in range(3)])
        logits = torch.stack([torch.stack([-((q - m) ** 2).sum() for m in means]) for q in query])
        total = total + F.cross_entropy(logits, batch.query_y[i])
    assert_close_dicts(ours, grads_of(protonet, total / len(batch)), 1e-8)


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_reptile_step_is_interpolation_toward_adapted_weights(batching: str) -> None:
    task, model, batch = regression()
    reptile = Reptile(ReptileConfig(inner_lr=0.05, inner_steps=3, batching=batching), model, task)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phis = []
    for i in range(len(batch)):
        fast = {n: p.clone().requires_grad_() for n, p in theta.items()}
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        for _ in range(3):
            loss = F.mse_loss(torch.func.functional_call(model, fast, (x,)), y)
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                n: (p - 0.05 * g).detach().requires_grad_()
                for (n, p), g in zip(fast.items(), grads, strict=True)
            }
        phis.append(fast)
    eps = 0.3
    optimizer = torch.optim.SGD(reptile.parameters(), lr=eps)
    optimizer.zero_grad()
    reptile.meta_loss(batch).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        phi = torch.stack([f[name] for f in phis]).mean(0)
        torch.testing.assert_close(p.detach(), theta[name] + eps * (phi - theta[name]))


@pytest.mark.parametrize("batching", ["vmap", "loop", "threads"])
def test_pretrain_fits_all_examples_jointly(batching: str) -> None:
    task, model, batch = regression()
    pretrain = Pretrain(PretrainConfig(inner_lr=LR, batching=batching), model, task)
    ours = grads_of(model, pretrain.meta_loss(batch).loss)
    total = sum(
        F.mse_loss(
            model(torch.cat([batch.support_x[i], batch.query_x[i]])),
            torch.cat([batch.support_y[i], batch.query_y[i]]),
        )
        for i in range(len(batch))
    )
    assert_close_dicts(ours, grads_of(model, total / len(batch)), 1e-10)


@pytest.mark.parametrize("norm", ["transductive", "per_step", "running"])
@pytest.mark.parametrize("algo", ["maml", "anil", "metasgd", "mamlpp", "protonet"])
def test_batched_equals_loop_on_conv4_with_batchnorm(algo: str, norm: str) -> None:
    """The vmap trap: batched second-order meta-gradients through batch norm are exact."""
    classes = {
        "maml": (MAML, MAMLConfig),
        "anil": (ANIL, ANILConfig),
        "metasgd": (MetaSGD, MetaSGDConfig),
        "mamlpp": (MAMLPP, MAMLPPConfig),
        "protonet": (ProtoNet, ProtoNetConfig),
    }
    cls, config = classes[algo]
    task, model, batch = classification(norm=norm, head=algo != "protonet")
    kwargs = {} if algo == "protonet" else {"inner_lr": LR, "inner_steps": STEPS}
    results, values = {}, {}
    for batching in ("vmap", "loop", "threads"):
        algorithm = cls(config(batching=batching, **kwargs), model, task)
        out = algorithm.meta_loss(batch)
        values[batching] = torch.cat([out.loss.reshape(1), out.metric])
        results[batching] = grads_of(algorithm, out.loss)
    for batching in ("vmap", "threads"):
        assert_close_dicts(results[batching], results["loop"], 1e-10)
        torch.testing.assert_close(values[batching], values["loop"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("algo", ["anil", "metasgd", "mamlpp", "reptile", "pretrain"])
def test_each_algorithm_learns_sinusoids(algo: str) -> None:
    torch.set_default_dtype(torch.float32)
    overrides = {
        "reptile": ["optim=sgd", "optim.lr=1.0", "optim.momentum=0"],
        "mamlpp": [
            "algo.inner_lr=0.01",
            "algo.inner_steps=2",
            "algo.test_inner_steps=2",
            "algo.msl_iterations=100",
        ],
    }
    c = build(
        compose_config(
            f"algo={algo}",
            "device=cpu",
            "train.meta_batch_size=10",
            "optim.lr=0.01",
            "train.iterations=400",
            *overrides.get(algo, []),
        )
    )
    before = evaluate(c, "val", 100, 100)
    for _ in range(400):
        meta_step(c, None)
    after = evaluate(c, "val", 100, 100)
    assert after.final < 0.6 * before.final, (before.final, after.final)


@pytest.mark.parametrize("algo", ["maml", "protonet", "anil"])
def test_classifiers_learn_a_synthetic_task(algo: str) -> None:
    torch.set_default_dtype(torch.float32)
    adaptation = ["algo.test_inner_steps=3", "algo.inner_lr=0.4"] if algo != "protonet" else []
    c = build(
        compose_config(
            f"algo={algo}",
            "task=synthetic",
            "model=conv4",
            "device=cpu",
            "model.filters=8",
            "task.noise=1.0",
            "train.meta_batch_size=4",
            "optim.lr=0.003",
            *adaptation,
        )
    )
    before = evaluate(c, "val", 40, 40)
    for _ in range(60):
        meta_step(c, None)
    after = evaluate(c, "val", 40, 40)
    assert after.final > before.final + 0.15 and after.final > 0.5, (before.final, after.final)


def test_conv4_variants_and_feature_sizes() -> None:
    torch.set_default_dtype(torch.float32)
    omniglot, mini = (1, 28, 28), (3, 84, 84)
    assert Conv4(Conv4Config(filters=64), omniglot, 5).feature_dim == 64  # 28->14->7->3->1
    assert Conv4(Conv4Config(filters=32), mini, 5).feature_dim == 32 * 5 * 5  # 84->...->5
    strided = Conv4(Conv4Config(filters=64, strided=True), omniglot, 5)
    assert strided.feature_dim == 64  # MAML's variant averages the last feature map
    assert strided(torch.zeros(3, *omniglot)).shape == (3, 5)
    assert Conv4(Conv4Config(), omniglot, None)(torch.zeros(3, *omniglot)).shape == (3, 64)


def test_running_batchnorm_uses_accumulated_statistics_at_test_time() -> None:
    torch.set_default_dtype(torch.float32)
    model = Conv4(Conv4Config(filters=4, norm="running"), (1, 16, 16), 2)
    layer = model.norm_layers()[0]
    inputs = 3.0 + torch.randn(2, 6, 1, 16, 16)
    before = layer.running_mean.clone()
    model.update_running_stats(inputs)
    assert not torch.equal(layer.running_mean, before)
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    # With running statistics a test example's output does not depend on its batch.
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    model.train()
    assert not torch.allclose(model(x)[:1], model(x[:1]))


def test_protonet_trains_with_more_ways_than_it_tests() -> None:
    torch.set_default_dtype(torch.float32)
    c = build(
        compose_config(
            "algo=protonet",
            "task=synthetic",
            "model=conv4",
            "device=cpu",
            "model.filters=4",
            "task.ways=8",
            "task.test_ways=3",
            "train.meta_batch_size=2",
        )
    )
    assert torch.isfinite(meta_step(c, None).loss)
    result = evaluate(c, "test", 4, 4)
    assert result.num_tasks == 4 and len(result.metric_mean) == 1


def test_head_based_algorithms_refuse_other_test_ways() -> None:
    from metacli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task\.test_ways"):
        build(compose_config("algo=maml", "task=synthetic", "task.test_ways=3", "device=cpu"))


def test_mamlpp_switches_on_per_step_norm_and_cosine_schedule() -> None:
    torch.set_default_dtype(torch.float32)
    c = build(
        compose_config(
            "algo=mamlpp", "task=synthetic", "model=conv4", "device=cpu", "model.filters=4"
        )
    )
    assert all(layer.mode == "per_step" for layer in c.model.norm_layers())
    assert isinstance(c.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    off = build(
        compose_config(
            "algo=mamlpp",
            "task=synthetic",
            "model=conv4",
            "device=cpu",
            "model.filters=4",
            "algo.per_step_bn=false",
            "algo.cosine_outer_lr=false",
        )
    )
    assert all(layer.mode == "transductive" for layer in off.model.norm_layers())
    assert off.scheduler is None


def test_auto_batching_follows_the_measured_preference() -> None:
    torch.set_default_dtype(torch.float32)
    # the sinusoid MLP's MAML: stacked (its meta-gradient written out), else vmap
    assert build(compose_config("device=cpu")).algorithm.batching == "stacked"
    assert build(compose_config("device=cpu", "algo=reptile")).algorithm.batching == "vmap"
    conv = ("task=synthetic", "model=conv4", "device=cpu", "model.filters=4")
    # tasks holding a graph run one at a time (one graph in memory); graph-free Reptile
    # overlaps them in threads, as evaluation (no graph) does
    maml = build(compose_config(*conv)).algorithm
    assert maml.batching == "loop"
    with torch.no_grad():
        assert maml.executor.strategy == "threads"
    assert build(compose_config(*conv, "algo=reptile")).algorithm.batching == "threads"
    # No inner loop: each task is one large batch, so the plain loop is taken instead.
    for algo in ("protonet", "pretrain"):
        assert build(compose_config(*conv, f"algo={algo}")).algorithm.batching == "loop"
    chosen = build(compose_config(*conv, "algo=protonet", "algo.batching=threads"))
    assert chosen.algorithm.batching == "threads"  # an explicit choice is kept


def test_threads_leave_a_single_task_in_the_calling_thread() -> None:
    """One single-threaded worker would use one core; the calling thread may use all."""
    torch.set_default_dtype(torch.float32)
    task, model, batch = classification(norm="transductive", head=True)
    maml = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS, batching="threads"), model, task)
    one = batch[:1]
    maml.meta_loss(one).loss.backward()
    assert maml.executor.workers is None  # no pool was started
    maml.meta_loss(batch).loss.backward()
    assert maml.executor.workers is not None and maml.executor.workers.replicas


def test_threads_compute_each_task_in_its_own_replica_and_restore_nothing_global() -> None:
    """Workers run single-threaded on model copies; the main thread's settings stay."""
    torch.set_default_dtype(torch.float32)
    threads = torch.get_num_threads()
    task, model, batch = classification(norm="per_step", head=True)
    maml = MAML(MAMLConfig(inner_lr=LR, inner_steps=STEPS, batching="threads"), model, task)
    maml.meta_loss(batch).loss.backward()
    assert torch.get_num_threads() == threads
    workers = maml.executor.workers
    assert (
        workers is not None
        and workers.replicas
        and all(r is not model for r in workers.replicas.values())
    )
    maml.eval()
    maml.evaluate(batch)  # replicas follow train/eval mode
    assert all(not r.training for r in workers.replicas.values())


def test_mlp_with_batch_norm_is_omniglotfc_and_its_batched_meta_gradient_exact() -> None:
    """model.norm on the MLP (MAML's fully connected network, learn2learn's OmniglotFC):
    Linear - batch norm over the batch - ReLU per hidden layer; its second-order MAML
    meta-gradient under vmap and threads equals the per-task loop's, and a reference
    written with PyTorch's own layers gives the same loss and meta-gradient."""
    task = Synthetic(SyntheticConfig(ways=3, shots=2, queries=2, image_size=8, classes=8))
    torch.manual_seed(0)
    cfg = MLPConfig(hidden=[10, 6], norm="transductive", norm_eps=1e-3, init="truncated_normal")
    model = MLP(cfg, task.input_shape, 3).double()
    with torch.no_grad():  # affine parameters away from 1 and 0, so they matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.startswith("body"):
                p.copy_(torch.rand(p.shape) + 0.5)
    batch = double(task.sample(3, "train", torch.Generator().manual_seed(1)))
    results = {}
    for batching in ("vmap", "loop", "threads"):
        maml = MAML(MAMLConfig(batching=batching, inner_lr=LR, inner_steps=STEPS), model, task)
        results[batching] = grads_of(maml, maml.meta_loss(batch).loss)
    for batching in ("vmap", "threads"):
        assert_close_dicts(results[batching], results["loop"], 1e-10)

    layers = [m for m in model.body if isinstance(m, nn.Linear)]
    norms = [m for m in model.body if not isinstance(m, (nn.Linear, nn.Flatten, nn.ReLU))]
    reference = nn.Sequential(nn.Flatten())
    for linear, norm in zip(layers, norms, strict=True):
        bn = nn.BatchNorm1d(linear.out_features, eps=1e-3, track_running_stats=False).double()
        with torch.no_grad():
            bn.weight.copy_(norm.weight)
            bn.bias.copy_(norm.bias)
        reference.extend([copy.deepcopy(linear), bn, nn.ReLU()])
    reference.append(copy.deepcopy(model.head))
    names = [n for n, _ in reference.named_parameters()]
    total = 0.0
    for i in range(len(batch)):  # MAML per task, written with autograd alone
        params = dict(reference.named_parameters())
        for _ in range(STEPS):
            support = F.cross_entropy(
                torch.func.functional_call(reference, params, (batch.support_x[i],)),
                batch.support_y[i],
            )
            grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
            params = {n: p - LR * g for (n, p), g in zip(params.items(), grads, strict=True)}
        query = torch.func.functional_call(reference, params, (batch.query_x[i],))
        total = total + F.cross_entropy(query, batch.query_y[i])
    reference_grads = grads_of(reference, total / len(batch))
    ours = [results["loop"][f"model.{n}"] for n, _ in model.named_parameters()]
    for name, value in zip(names, ours, strict=True):
        torch.testing.assert_close(value, reference_grads[name], rtol=1e-10, atol=1e-12)
