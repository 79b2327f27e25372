"""The adaptation engine: random streams, the executor, the inner loop, update rules,
parameter groups, named terms and hooks, each against a reference computed apart."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metacli.algorithms.adaptive import Adaptive
from metacli.build import build, resolve
from metacli.checkpoint import LoopState
from metacli.contract import MemoryRecorder
from metacli.engine.executor import TaskExecutor
from metacli.engine.inner import last
from metacli.errors import ConfigError, MetacliError
from metacli.loop import meta_step, meta_train, sample
from metacli.models.mlp import MLP, MLPConfig
from metacli.streams import TaskRandom, task_keys
from tests.conftest import TINY, compose_config, read_metrics, run_cli

SINUSOID = ("device=cpu", "model.hidden=[12,12]", "model.activation=tanh")


def flat_grads(c: Any, batch: Any) -> Tensor:
    c.algorithm.zero_grad()
    c.algorithm.meta_loss(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in c.algorithm.parameters()])


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- per-task random streams -------------------------------------------------------------
def test_task_streams_depend_on_seed_stream_iteration_and_index_only() -> None:
    keys = task_keys(0, "train", 7, 0, 5)
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 5
    torch.testing.assert_close(task_keys(0, "train", 7, 2, 3), keys[2:])  # any chunk
    for other in (task_keys(1, "train", 7, 0, 5), task_keys(0, "val", 7, 0, 5)):
        assert not set(other.tolist()) & set(keys.tolist())
    assert not set(task_keys(0, "train", 8, 0, 5).tolist()) & set(keys.tolist())


def test_task_random_is_uniform_normal_and_independent_across_tasks() -> None:
    a, b = (TaskRandom(k) for k in task_keys(0, "train", 0, 0, 2))
    u = a.uniform((200_000,), torch.float64)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    z, w = a.normal((200_000,), torch.float64), b.normal((200_000,), torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([z, w]))[0, 1].item()) < 0.01
    again = TaskRandom(a.key)
    torch.testing.assert_close(again.uniform((200_000,), torch.float64), u)  # same key, same draws
    assert not torch.equal(again.uniform((10,)), u[:10].float())  # each call draws anew


# --- the executor ------------------------------------------------------------------------
def task_function(rng: TaskRandom, shared: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    noise = rng.normal(tuple(x.shape), x.dtype)
    return {"value": (shared * (x + noise)).sum() + y, "draw": rng.uniform((2,), x.dtype)}


@pytest.mark.parametrize("strategy", ["vmap", "loop", "threads"])
def test_executor_maps_shared_and_per_task_inputs_identically(float64, strategy: str) -> None:
    model = MLP(MLPConfig(hidden=[4]), (1,), 1)
    shared, x, y = torch.randn(3), torch.randn(5, 3), torch.randn(5)
    keys = task_keys(0, "train", 0, 0, 5)
    executor = TaskExecutor(strategy, model)
    executor.stochastic = True
    out = executor.map(task_function, keys, (shared,), (x, y))
    reference = [task_function(TaskRandom(keys[i]), shared, x[i], y[i]) for i in range(5)]
    for name in ("value", "draw"):
        torch.testing.assert_close(out[name], torch.stack([r[name] for r in reference]))


@pytest.mark.parametrize("strategy", ["vmap", "loop", "threads"])
def test_drawing_from_the_global_generator_inside_a_task_is_refused(strategy: str) -> None:
    model = MLP(MLPConfig(hidden=[4]), (1,), 1)

    def careless(rng: TaskRandom, x: Tensor) -> Tensor:
        return x + torch.randn(x.shape)

    with pytest.raises(MetacliError, match="global random generator"):
        TaskExecutor(strategy, model).map(careless, None, (), (torch.zeros(4, 3),))

    def undeclared(rng: TaskRandom, x: Tensor) -> Tensor:
        return x + rng.normal(tuple(x.shape))

    with pytest.raises(MetacliError, match="stochastic = True"):
        TaskExecutor(strategy, model).map(undeclared, None, (), (torch.zeros(4, 3),))


# --- update rules --------------------------------------------------------------------------
def test_momentum_rule_equals_torch_sgd_with_momentum_step_for_step(float64) -> None:
    c = build(
        compose_config("update=momentum", "algo.momentum=0.7", "algo.inner_lr=0.05", *SINUSOID)
    )
    algorithm = c.algorithm
    assert isinstance(algorithm, Adaptive)
    batch = c.task.sample(1, "train", torch.Generator().manual_seed(0))
    x, y = batch.support_x[0], batch.support_y[0]
    params = {n: p.detach() for n, p in algorithm.initial_params().items()}
    steps = list(algorithm.adapt(params, x, y, 4, 0.05, True, TaskRandom(torch.tensor(0))))
    model = MLP(MLPConfig(hidden=[12, 12], activation="tanh"), (1,), 1)
    model.load_state_dict(c.model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.7)
    for step in steps[1:]:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(step.params[name], p.detach(), rtol=1e-12, atol=1e-12)


def test_momentum_setting_is_checked_and_recorded() -> None:
    with pytest.raises(ConfigError, match=r"algo\.momentum"):
        build(compose_config("update=momentum", "algo.momentum=1.5", "device=cpu"))
    c = build(compose_config("update=momentum", "algo.momentum=0.5", "device=cpu"))
    assert c.cfg.algo["update"] == "momentum" and c.cfg.algo.momentum == 0.5  # what is recorded
    default = build(compose_config("algo.update=momentum", "device=cpu"))
    assert default.cfg.algo.momentum == 0.9  # the rule's default, recorded too


def test_maml_with_the_metasgd_rule_is_metasgd(float64) -> None:
    common = (*SINUSOID, "algo.inner_steps=2", "algo.test_inner_steps=2", "algo.inner_lr=0.05")
    a = build(compose_config("algo=maml", "algo.update=metasgd", *common))
    b = build(compose_config("algo=metasgd", *common))
    assert [n for n, _ in a.algorithm.named_parameters()] == [
        n for n, _ in b.algorithm.named_parameters()
    ]
    for _ in range(3):  # equal through training, not only at the start
        batch_a, batch_b = sample(a), sample(b)
        torch.testing.assert_close(flat_grads(a, batch_a), flat_grads(b, batch_b), rtol=0, atol=0)
        meta_step(a, None)
        meta_step(b, None)
    ev_a, ev_b = a.algorithm.evaluate(batch_a), b.algorithm.evaluate(batch_b)
    torch.testing.assert_close(ev_a.metric, ev_b.metric, rtol=0, atol=0)


def test_maml_with_the_lslr_rule_is_mamlpp_with_its_other_tricks_off(float64) -> None:
    common = ("task=synthetic", "model=conv4", "model.filters=3", "task.image_size=16")
    common += ("task.ways=3", "task.queries=2", "device=cpu", "algo.inner_steps=2")
    common += ("algo.inner_lr=0.1", "algo.test_inner_steps=2")
    maml = build(compose_config("algo=maml", "algo.update=lslr", *common))
    off = ("algo.multi_step_loss=false", "algo.per_step_bn=false", "algo.cosine_outer_lr=false")
    off += ("algo.adapt_norm=true",)  # MAML++ keeps its norm out of the inner loop
    mamlpp = build(compose_config("algo=mamlpp", *off, *common))
    assert isinstance(mamlpp.scheduler, type(maml.scheduler))  # neither anneals
    for rates in (maml.algorithm.learned_rates(), mamlpp.algorithm.learned_rates()):
        for k, rate in enumerate(rates.values()):  # the same distinct rates in both
            with torch.no_grad():
                rate.copy_(0.1 + 0.01 * torch.arange(rate.numel()) + 0.001 * k)
    batch = sample(maml)
    torch.testing.assert_close(flat_grads(maml, batch), flat_grads(mamlpp, batch), rtol=0, atol=0)


def test_stateless_rules_of_reptile_and_pretrain_only(float64) -> None:
    for algo in ("reptile", "pretrain"):
        with pytest.raises(ConfigError, match=r"algo\.update=metasgd"):
            build(compose_config(f"algo={algo}", "algo.update=metasgd", "device=cpu"))
    with pytest.raises(ConfigError, match=r"algo\.update='adamw' is not an option"):
        build(compose_config("algo.update=adamw", "device=cpu"))


# --- the inner-loop driver -----------------------------------------------------------------
def test_inner_loop_exposes_each_step_loss_and_gradient(float64) -> None:
    c = build(compose_config(*SINUSOID, "algo.inner_lr=0.1"))
    algorithm = c.algorithm
    assert isinstance(algorithm, Adaptive)
    batch = c.task.sample(1, "train", torch.Generator().manual_seed(0))
    x, y = batch.support_x[0], batch.support_y[0]
    params = {n: p.detach() for n, p in algorithm.initial_params().items()}
    rng = TaskRandom(torch.tensor(0))
    assert all(s.loss is None for s in algorithm.adapt(params, x, y, 2, 0.1, True, rng))
    steps = list(algorithm.adapt(params, x, y, 3, 0.1, True, rng, keep_loss=True))
    assert [s.index for s in steps] == [0, 1, 2, 3] and steps[0].loss is None
    for before, after in itertools.pairwise(steps):
        leaves = {n: p.clone().requires_grad_() for n, p in before.params.items()}
        loss = F.mse_loss(torch.func.functional_call(c.model, leaves, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        assert after.loss is not None and after.grads is not None
        torch.testing.assert_close(after.loss, loss.detach())
        for (name, p), g in zip(before.params.items(), grads, strict=True):
            torch.testing.assert_close(after.grads[name], g)
            torch.testing.assert_close(after.params[name], p - 0.1 * g)
    assert last(iter(steps)) is steps[-1]


# --- the hybrid objective: an extra loss term ------------------------------------------------
def test_hybrid_reduces_to_pretraining_and_to_maml(float64) -> None:
    common = (*SINUSOID, "algo.inner_steps=2", "algo.inner_lr=0.05")
    batch = sample(build(compose_config(*common)))
    pairs = {
        "pretrain": ("algo.lam=0", "algo=pretrain"),
        "maml": ("algo.task_weight=0", "algo=maml"),
    }
    for hybrid_setting, other in pairs.values():
        hybrid = build(compose_config("algo=hybrid", hybrid_setting, *common))
        reference = build(compose_config(other, *common))
        error = relative_error(flat_grads(hybrid, batch), flat_grads(reference, batch))
        assert error < 1e-12, other
    both = build(compose_config("algo=hybrid", "algo.lam=2", "algo.task_weight=0.5", *common))
    out = both.algorithm.meta_loss(batch)
    total = 0.5 * out.terms["task_loss"] + 2 * out.terms["maml_loss"]
    torch.testing.assert_close(out.loss, total)


def test_named_terms_reach_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    run_cli("train", *TINY, "algo=hybrid", "logger=tensorboard", "hydra.run.dir=h", cwd=tmp_path)
    train = [r for r in read_metrics(tmp_path / "h") if r["split"] == "train"]
    assert train and all({"task_loss", "maml_loss", "inner_lr", "lr"} <= r.keys() for r in train)
    assert all(r["task_loss"] > 0 and r["maml_loss"] > 0 for r in train)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "h" / "tensorboard"))
    events.Reload()
    assert {"train/task_loss", "train/maml_loss"} <= set(events.Tags()["scalars"])


def test_learned_rates_and_group_rates_are_logged() -> None:
    c = build(compose_config(*TINY, "algo=metasgd", "device=cpu"))
    recorder = Recorder()
    meta_train(c, recorder, LoopState())
    logged = [r for r in recorder.records if r["split"] in ("train", "val")]
    assert logged and all({"inner_lr_mean", "lr", "lr_update"} <= r.keys() for r in logged)


# --- outer-loop hooks --------------------------------------------------------------------------
def test_parameter_groups_have_their_own_rates_and_no_decay_on_learned_rates() -> None:
    c = build(compose_config("algo=metasgd", "device=cpu", "optim.weight_decay=0.1"))
    groups = {g["name"]: g for g in c.optimizer.param_groups}
    assert groups["model"]["weight_decay"] == 0.1 and groups["update"]["weight_decay"] == 0.0
    assert groups["model"]["lr"] == groups["update"]["lr"] == 1e-3
    rates = {id(p) for p in c.algorithm.learned_rates().values()}
    assert {id(p) for p in groups["update"]["params"]} == rates
    model = {id(p) for p in c.model.parameters()}
    assert {id(p) for p in groups["model"]["params"]} == model
    custom = build(
        compose_config(
            "algo=metasgd",
            "device=cpu",
            "optim.groups.update.lr=0.05",
            "optim.groups.update.weight_decay=0.01",
        )
    )
    update = next(g for g in custom.optimizer.param_groups if g["name"] == "update")
    assert update["lr"] == 0.05 and update["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match=r"optim\.groups\.arch"):
        build(compose_config("device=cpu", "+optim.groups.arch.lr=0.1"))


Recorder = MemoryRecorder  # an in-memory run folder for the loop


def test_validation_and_end_of_training_hooks_run_and_are_recorded() -> None:
    c = build(compose_config(*TINY, "device=cpu"))
    calls: list[tuple[str, int]] = []
    algorithm = c.algorithm
    algorithm.on_validation = lambda it, metric: calls.append(("val", it)) or {"pruned": 1.0}  # type: ignore[method-assign]
    algorithm.on_train_end = lambda it: calls.append(("end", it)) or {"final_size": 3.0}  # type: ignore[method-assign]
    algorithm.artifacts = lambda: {"genotype.json": json.dumps({"iteration": len(calls)})}  # type: ignore[method-assign]
    recorder = Recorder()
    meta_train(c, recorder, LoopState())
    assert calls == [("val", 10), ("val", 20), ("end", 20)]
    vals = [r for r in recorder.records if r["split"] == "val"]
    assert [r["pruned"] for r in vals] == [1.0, 1.0]
    assert any(r.get("final_size") == 3.0 for r in recorder.records if r["split"] == "train_end")
    assert json.loads(recorder.files["genotype.json"]) == {"iteration": 3}
    assert set(recorder.checkpoints) == {"best", "last"}


def test_mamlpp_records_the_settings_that_ran(tmp_path: Path) -> None:
    run_cli(
        "train", *TINY, "algo=mamlpp", "algo.on_regression=true", "hydra.run.dir=p", cwd=tmp_path
    )
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["config"]["optim"]["scheduler"] == "cosine"
    assert (tmp_path / "p" / ".hydra" / "config.yaml").read_text().count("scheduler: none") == 1
    checkpoint = torch.load(tmp_path / "p" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["config"]["optim"]["scheduler"] == "cosine"
    conv = ("task=synthetic", "model=conv4", "model.filters=4", "task.image_size=16")
    config = resolve(compose_config("algo=mamlpp", *conv, "device=cpu")).effective
    assert config.model.norm == "per_step" and config.model.norm_steps == 5  # N sets, N steps
    assert config.optim.scheduler == "cosine"
