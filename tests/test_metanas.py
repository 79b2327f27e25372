"""Architecture search (model=darts, algo=metanas, model=genotype): a one-operation search
space is plain MAML/Reptile on the fixed network; mixed operations are the softmax-weighted
sums of their operations and select the argmax as the temperature goes to zero; the DARTS
discretisation on hand-set alphas; genotype.json round-trips into model=genotype with the
parameter count computed by hand; the architecture's own optimizer group; warm-up,
annealing, per-task draws and what is logged and written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from metacli.algorithms.metanas import MetaNAS
from metacli.build import Components, build
from metacli.errors import ConfigError
from metacli.evaluation import evaluate
from metacli.loop import meta_step, sample
from metacli.models.darts import Darts, discretize
from metacli.models.operations import OPS, Edge
from metacli.streams import TaskRandom, task_keys
from tests.conftest import compose_config
from tests.test_contract import SEARCH

IMAGES = ("task=synthetic", "task.image_size=8", "task.ways=3", "task.shots=2", "task.queries=2")
TINY = (
    *IMAGES,
    *SEARCH,
    "device=cpu",
    "train.meta_batch_size=2",
    "algo.inner_steps=2",
    "algo.inner_lr=0.1",
)


# one node: conv_3x3 on input 0 plus the identity of input 1 (normal cell)
GENE = {
    "normal": [[["conv_3x3", 0], ["skip_connect", 1]]],
    "reduce": [[["max_pool_3x3", 0], ["skip_connect", 1]]],
    "nodes": 1,
    "channels": 4,
    "cells": 1,
    "reductions": [],
    "stem_multiplier": 1,
}


def genotype_network(folder: Path, gene: dict[str, object]) -> Components:
    """model=genotype of ``gene`` (written to folder/genotype.json) on 5-way 8x8 images."""
    (folder / "genotype.json").write_text(json.dumps(gene))
    return build(
        compose_config(
            "model=genotype", f"model.genotype={folder}", "task=synthetic",
            "task.image_size=8", "task.channels=1", "task.ways=5", "device=cpu",
        )
    )  # fmt: skip


def darts(c: Components) -> Darts:
    assert isinstance(c.model, Darts)
    return c.model


def test_mixed_operation_is_the_softmax_weighted_sum_and_the_argmax_at_zero_temperature(
    float64,
) -> None:
    names = ["conv_3x3", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "zero"]
    edge = Edge(names, 3, 1, False)
    x = torch.randn(4, 3, 6, 6)
    alpha = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.0])
    c = build(compose_config(*TINY, "algo=metanas", f"model.ops=[{','.join(names)}]"))
    model = darts(c)
    weights = model.edge_weights(alpha)
    torch.testing.assert_close(weights, torch.softmax(alpha, 0), rtol=0, atol=0)
    one_by_one = sum(w * op(x) for w, op in zip(weights, edge.ops, strict=True))
    assert isinstance(one_by_one, Tensor)
    torch.testing.assert_close(edge(x, weights), one_by_one, rtol=1e-13, atol=1e-13)
    model.temperature.fill_(1e-4)  # -> the argmax operation (skip_connect) alone
    cold = model.edge_weights(alpha)
    assert cold.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(edge(x, cold), x)


def test_discretisation_keeps_the_strongest_edges_and_their_best_non_zero_operations() -> None:
    ops = ["conv_3x3", "max_pool_3x3", "zero"]
    weights = torch.tensor(
        [
            # node 0: inputs 0 and 1
            [0.5, 0.2, 0.3],  # best conv_3x3 (0.5)
            [0.1, 0.3, 0.6],  # zero wins but is excluded: max_pool_3x3 (0.3)
            # node 1: inputs 0, 1 and node 0 (input 2)
            [0.2, 0.1, 0.7],  # max_pool? no: conv_3x3 0.2 > 0.1
            [0.1, 0.8, 0.1],  # max_pool_3x3 0.8
            [0.6, 0.3, 0.1],  # conv_3x3 0.6
        ]
    )
    assert discretize(weights, ops, 2, 2) == [
        [["conv_3x3", 0], ["max_pool_3x3", 1]],
        [["max_pool_3x3", 1], ["conv_3x3", 2]],
    ]
    assert discretize(weights, ops, 2, 1) == [[["conv_3x3", 0]], [["max_pool_3x3", 1]]]


def test_genotype_json_round_trips_into_model_genotype_with_the_counted_parameters(
    tmp_path: Path,
) -> None:
    c = genotype_network(tmp_path, GENE)
    # stem 1->4 3x3 (36) + affine norm (8); two 1x1 preprocessings 4->4 (16 + 8 each);
    # conv_3x3 4->4 (144 + 8); skip (0); head 4 -> 5 (25)
    assert sum(p.numel() for p in c.model.parameters()) == 44 + 2 * 24 + 152 + 25
    assert c.algorithm.evaluate(sample(c)).metric.shape[0] == 25  # it runs
    # a search writes what model=genotype reads
    search = build(compose_config(*TINY, "algo=metanas"))
    written = json.loads(MetaNAS.artifacts(search.algorithm)["genotype.json"])  # type: ignore[arg-type]
    assert written == darts(search).genotype()
    (tmp_path / "g.json").write_text(json.dumps(written))
    derived = build(
        compose_config(*IMAGES, "model=genotype", f"model.genotype={tmp_path / 'g.json'}")
    )
    assert len(derived.model.cells) == 2 and sum(len(n) for n in written["normal"]) == 4
    for bad in ("", str(tmp_path / "missing")):
        with pytest.raises(ConfigError, match=r"model\.genotype"):
            build(compose_config(*IMAGES, "model=genotype", f"model.genotype={bad}"))


@pytest.mark.parametrize(("meta", "plain"), [("maml", "maml"), ("reptile", "reptile")])
def test_one_operation_with_alpha_frozen_is_plain_meta_learning_on_the_fixed_network(
    float64, tmp_path: Path, meta: str, plain: str
) -> None:
    """Search space {conv_3x3} (its weight is 1 whatever alpha), every edge kept, alpha not
    adapted: the meta-loss and the weights' meta-gradient equal algo=maml / algo=reptile on
    model=genotype with that genotype (affine-free norm, as in the search cells)."""
    one = (*TINY, "model.ops=[conv_3x3]", "model.keep=10")
    search = build(
        compose_config(*one, "algo=metanas", f"algo.meta={meta}", "algo.adapt_alpha=false")
    )
    (tmp_path / "genotype.json").write_text(json.dumps(darts(search).genotype()))
    fixed = build(
        compose_config(
            *(o for o in TINY if not o.startswith("model.")), f"algo={plain}", "model=genotype",
            f"model.genotype={tmp_path}", "model.affine=false",
        )
    )  # fmt: skip
    weights = {k: v for k, v in search.model.state_dict().items() if "alpha" not in k}
    weights.pop("temperature")
    fixed.model.load_state_dict(weights, strict=True)
    batch = sample(search)
    ours, theirs = search.algorithm.meta_loss(batch), fixed.algorithm.meta_loss(batch)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in fixed.model.named_parameters()]
    ours_grads = torch.autograd.grad(ours.loss, [getattr_path(search, n) for n in names])
    theirs_grads = torch.autograd.grad(theirs.loss, list(fixed.model.parameters()))
    assert sum(g.abs().sum() for g in theirs_grads) > 0
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def getattr_path(c: Components, name: str) -> Tensor:
    return dict(c.model.named_parameters())[name]


def test_architecture_weights_have_their_own_optimizer_group() -> None:
    c = build(
        compose_config(
            *TINY, "algo=metanas", "optim=sgd", "optim.lr=1.0", "optim.weight_decay=0.01",
            "optim.groups.architecture.lr=0.6", "optim.groups.architecture.weight_decay=0.001",
        )
    )  # fmt: skip
    groups = {g["name"]: g for g in c.optimizer.param_groups}
    assert set(groups) == {"model", "architecture"}
    assert groups["architecture"]["lr"] == 0.6 and groups["architecture"]["weight_decay"] == 0.001
    assert groups["model"]["lr"] == 1.0 and groups["model"]["weight_decay"] == 0.01
    model = darts(c)
    assert {id(p) for p in groups["architecture"]["params"]} == {
        id(model.alpha_normal),
        id(model.alpha_reduce),
    }
    assert all(id(p) != id(model.alpha_normal) for p in groups["model"]["params"])


def test_warm_up_freezes_alpha_and_the_temperature_anneals_over_the_run() -> None:
    c = build(
        compose_config(
            *TINY, "algo=metanas", "algo.meta=fomaml", "algo.warmup_iterations=2",
            "algo.temperature_end=0.2", "model.temperature=1.0", "train.iterations=4",
        )
    )  # fmt: skip
    assert c.cfg.algo.anneal_iterations == 4  # recorded: what ran
    model = darts(c)
    before = model.alpha_normal.detach().clone()
    weights = model.stem[0].weight.detach().clone()
    temperatures = []
    for _ in range(4):
        meta_step(c, None)
        temperatures.append(float(model.temperature))
        if len(temperatures) <= 2:  # warm-up: alpha untouched, w learns
            assert torch.equal(model.alpha_normal.detach(), before)
    assert not torch.equal(model.stem[0].weight.detach(), weights)
    assert not torch.equal(model.alpha_normal.detach(), before)  # after the warm-up
    assert temperatures == pytest.approx([0.8, 0.6, 0.4, 0.2])
    scalars = c.algorithm.scalars()
    assert scalars["temperature"] == pytest.approx(0.2)
    edge = [v for k, v in scalars.items() if k.startswith("arch_normal_n1_i2_")]
    assert len(edge) == len(model.cfg.ops) and sum(edge) == pytest.approx(1.0)


def test_gumbel_draws_one_architecture_per_task_from_its_stream(float64) -> None:
    c = build(compose_config(*TINY, "algo=metanas", "model.sampling=gumbel"))
    model = darts(c)
    assert c.algorithm.executor.stochastic and not c.algorithm.exact_gradient
    noise = model.draw(TaskRandom(torch.tensor(7)))
    assert set(noise) == {"gumbel_normal", "gumbel_reduce"}
    assert torch.equal(
        noise["gumbel_normal"], model.draw(TaskRandom(torch.tensor(7)))["gumbel_normal"]
    )
    weights = model.edge_weights(model.alpha_normal, noise["gumbel_normal"])
    assert set(weights.sum(-1).tolist()) == {1.0} and set(weights.flatten().tolist()) == {0.0, 1.0}
    out = c.algorithm.meta_loss(sample(c))
    out.loss.backward()
    assert model.alpha_normal.grad is not None and model.alpha_normal.grad.abs().sum() > 0


def test_metanas_needs_the_search_network_and_checks_its_settings() -> None:
    with pytest.raises(ConfigError, match="needs model=darts"):
        build(compose_config("algo=metanas", "task=synthetic", "model=conv4", "device=cpu"))
    for override, key in (
        ("algo.meta=sgd", "algo.meta"),
        ("model.ops=[conv_3x3,conv_9x9]", "model.ops"),
        ("model.sampling=hard", "model.sampling"),
        ("algo.first_order=true", "algo.first_order"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build(compose_config(*TINY, "algo=metanas", override))


def test_artifacts_are_the_genotype_and_its_picture() -> None:
    pytest.importorskip("matplotlib")
    c = build(compose_config(*TINY, "algo=metanas"))
    files = c.algorithm.artifacts()
    picture = files["genotype.png"]
    assert isinstance(picture, bytes) and picture.startswith(b"\x89PNG")
    assert set(json.loads(files["genotype.json"])["normal"][0][0]) <= set(OPS) | {0, 1}


@pytest.mark.parametrize("setting", ["model.sampling=gumbel", "algo.task_genotypes=true"])
def test_the_meta_test_reports_each_tasks_architecture(setting: str) -> None:
    """Drawn architectures (gumbel: each edge's drawn operation, as the task's own stream
    gives it) or T-NAS's task-specific genotypes, counted in the test summary."""
    adapt = "algo.adapt_alpha=false" if "gumbel" in setting else "algo.adapt_alpha=true"
    c = build(compose_config(*TINY, "algo=metanas", setting, adapt, "algo.inner_lr=0.5"))
    summary = evaluate(c, "test", 6, 3)
    assert len(summary.labels) == 6
    counts = summary.as_dict()["labels"]
    assert sum(counts["counts"].values()) == 6 and counts["distinct"] == len(set(summary.labels))
    first = json.loads(summary.labels[0])
    if setting.startswith("model.sampling"):
        model = darts(c)
        keys = task_keys(c.run.seed, "test", 0, 0, 6)
        noise = model.draw(TaskRandom(keys[0]))["gumbel_normal"]
        drawn = (model.alpha_normal.detach() + noise).argmax(-1)
        assert first["normal"] == [model.cfg.ops[int(k)] for k in drawn]  # alpha not adapted
    else:
        assert len(first["normal"]) == 2 and all(len(node) == 2 for node in first["normal"])
    assert counts["distinct"] >= 1


def test_the_task_schedule_anneals_the_temperature_over_each_inner_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MetaNAS's normalizer: t_max at inner step 0, linear to t_min at the last step and
    on the query; t_max throughout while alpha is frozen; the buffer itself unchanged."""
    seen: list[float] = []
    original = Darts.edge_weights

    def recording(self: Darts, alpha: Tensor, noise: Tensor | None = None) -> Tensor:
        seen.append(round(float(self.temperature), 6))
        return original(self, alpha, noise)

    monkeypatch.setattr(Darts, "edge_weights", recording)
    settings = ("algo.temperature_end=0.1", "algo.temperature_schedule=task")
    c = build(
        compose_config(*TINY, "algo=metanas", "algo.meta=fomaml", "algo.inner_steps=4", *settings)
    )
    assert c.cfg.algo.anneal_iterations is None  # nothing anneals over the run
    c.algorithm.meta_loss(sample(c)[:1])
    # two cell types per forward: steps 0..3 on the support, then the query after 4 steps
    assert seen[::2] == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.1])
    assert float(darts(c).temperature) == 1.0
    seen.clear()
    frozen = build(compose_config(*TINY, "algo=metanas", "algo.warmup_iterations=5", *settings))
    frozen.algorithm.meta_loss(sample(frozen)[:1])
    assert set(seen) == {1.0}


def test_separable_conv_3x3_is_the_codes_dilconv_and_the_genotype_carries_it(
    tmp_path: Path,
) -> None:
    """model.conv_3x3=separable builds MetaNAS's DilConv(dilation 1): ReLU, a depthwise 3x3
    convolution, a pointwise 1x1, batch norm; genotype.json records the choice, so the found
    network rebuilds the same operation (older files, without it: a plain convolution)."""
    c = genotype_network(tmp_path, {**GENE, "conv_3x3": "separable"})
    # as the plain network of the round-trip test, with conv_3x3 4->4 as depthwise 3x3
    # (4 x 9 = 36) and pointwise 1x1 (16) and its affine norm (8) in place of 144 + 8
    assert sum(p.numel() for p in c.model.parameters()) == 44 + 2 * 24 + 36 + 16 + 8 + 25
    shapes = [tuple(p.shape) for n, p in c.model.named_parameters() if ".edges.0." in n]
    assert shapes == [(4, 1, 3, 3), (4, 4, 1, 1), (4,), (4,)]
    search = build(compose_config(*TINY, "algo=metanas", "model.conv_3x3=separable"))
    assert darts(search).genotype()["conv_3x3"] == "separable"
    with pytest.raises(ConfigError, match=r"model\.conv_3x3"):
        build(compose_config(*TINY, "algo=metanas", "model.conv_3x3=dilated"))


# The authors' scripts (boschresearch/metanas scripts/run_og_meta_train.sh and
# run_in_meta_train.sh, with utils/utils.py's hp_setting og_metanas / in_metanas and
# tasks/torchmeta_loader.py): --k ways, --n test shots, n_train training shots, --q queries,
# batch_size / batch_size_test examples per inner step, task_train_steps / test steps (50,
# the default), w_lr, meta_batch_size, meta_epochs, warm_up_epochs, t_min, eval_epochs x
# test_meta_batch_size test tasks.
AUTHORS = {
    "metanas_omniglot": {
        "task.ways": 20, "task.shots": 15, "task.test_shots": 5, "task.queries": 1,
        "algo.inner_batch": 20, "algo.test_inner_batch": 10, "algo.inner_steps": 5,
        "algo.test_inner_steps": 50, "algo.adam_lr": 0.005, "train.meta_batch_size": 10,
        "train.iterations": 30000, "algo.warmup_iterations": 15000,
        "algo.temperature_end": 0.05, "test.num_tasks": 5000, "model.channels": 28,
        "model.cells": 4, "model.reductions": [1, 3], "model.conv_3x3": "separable",
        "model.pairwise_inputs": True, "model.prune_threshold": 0.01, "model.drop_path": 0.2,
        "algo.meta_prune_threshold": 0.01, "task.split": "lake", "algo.alternate": True,
        "algo.alpha_weight_decay": 0.001, "algo.w_grad_clip": 1e6,
        "task.test_rotations": [0, 90, 180, 270],
    },
    "metanas_miniimagenet": {
        "task.ways": 5, "task.shots": 15, "task.test_shots": 5, "task.queries": 1,
        "algo.inner_batch": 20, "algo.test_inner_batch": 15, "algo.inner_steps": 5,
        "algo.test_inner_steps": 50, "algo.adam_lr": 0.001, "train.meta_batch_size": 10,
        "train.iterations": 30000, "algo.warmup_iterations": 15000,
        "algo.temperature_end": 0.1, "test.num_tasks": 5000, "model.channels": 28,
        "model.cells": 4, "model.reductions": [1, 3], "model.conv_3x3": "separable",
        "model.pairwise_inputs": True, "model.prune_threshold": 0.01, "model.drop_path": 0.2,
        "algo.meta_prune_threshold": 0.01, "algo.alternate": True,
        "algo.alpha_weight_decay": 0.001, "algo.w_grad_clip": 1e6,
    },
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_presets_run_the_authors_protocol(preset: str) -> None:
    from omegaconf import OmegaConf

    cfg = compose_config(f"experiment={preset}")
    for key, value in AUTHORS[preset].items():
        found = OmegaConf.select(cfg, key)
        found = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
        assert found == value, (preset, key, found, value)


def test_pairwise_input_alphas_weight_each_pair_of_inputs_and_keep_the_strongest(
    float64,
) -> None:
    """model.pairwise_inputs: node i's output is sum over its input pairs (a, b) of
    softmax(alpha_pw)_ab x (edge_a + edge_b) (MetaNAS's SearchCell), and the genotype keeps
    the two inputs of each node's strongest pair with their best operations."""
    c = build(compose_config(*TINY, "algo=metanas", "model.pairwise_inputs=true"))
    model = darts(c)
    assert "alpha_pw_normal" in model.architecture_names()
    assert tuple(model.alpha_pw_normal.shape) == (1 + 3,)  # node 0: 1 pair, node 1: 3
    cell = model.cells[0]
    with torch.no_grad():
        model.alpha_pw_normal.copy_(torch.tensor([0.2, 1.0, -0.5, 0.3]))
    s0, s1 = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    weights = model.edge_weights(model.alpha_normal)
    got = cell(s0, s1, weights, model.input_weights(model.alpha_pw_normal))
    # by hand: node 0 has the one pair (0, 1), weight 1; node 1 the pairs (0,1), (0,2), (1,2)
    states = [cell.pre0(s0), cell.pre1(s1)]
    e = [cell.edges[k](states[k], weights[k]) for k in range(2)]
    states.append(e[0] + e[1])
    pair = torch.softmax(torch.tensor([1.0, -0.5, 0.3]), 0)
    f = [cell.edges[2 + j](states[j], weights[2 + j]) for j in range(3)]
    states.append(pair[0] * (f[0] + f[1]) + pair[1] * (f[0] + f[2]) + pair[2] * (f[1] + f[2]))
    torch.testing.assert_close(got, torch.cat(states[2:], 1), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # node 1: the pair (1, 2) strongest, each edge's best operation
        model.alpha_pw_normal.copy_(torch.tensor([0.0, 0.1, 0.2, 2.0]))
        model.alpha_normal.zero_()
        model.alpha_normal[2:, 0] = 1.0  # the first operation on node 1's edges
    gene = model.genotype()["normal"]
    assert [j for _, j in gene[1]] == [1, 2]
    assert {op for op, _ in gene[1]} == {model.cfg.ops[0]}


def test_pruned_operations_and_pairs_take_no_part_and_the_meta_model_is_pruned(
    float64,
) -> None:
    """model.prune_threshold drops the operations (and input pairs) of weight at most the
    threshold from the forward pass; algo.meta_prune_threshold sets the meta-learned alphas
    below it (at the final temperature) to -1e9 every algo.meta_prune_every outer steps."""
    c = build(
        compose_config(
            *TINY, "algo=metanas", "model.prune_threshold=0.2", "model.pairwise_inputs=true",
            "algo.meta_prune_threshold=0.2", "algo.meta_prune_every=2", "algo.meta=fomaml",
        )
    )  # fmt: skip
    model = darts(c)
    ops = len(model.cfg.ops)
    alpha = torch.zeros(ops)
    alpha[0] = 3.0  # one operation dominant: the rest below 0.2 are dropped
    weights = model.edge_weights(alpha)
    soft = torch.softmax(alpha, 0)
    torch.testing.assert_close(weights, soft * (soft > 0.2))
    assert int((weights > 0).sum()) == 1
    pairs = model.input_weights(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    # node 0's single pair (weight 1) is kept; node 1's pair (0, 1) dominates, the others
    # (weight ~0.007) are dropped: inputs 0 and 1 weigh its weight, input 2 nothing
    assert pairs[:2].tolist() == [1.0, 1.0]
    top = torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0]
    torch.testing.assert_close(pairs[2:], torch.stack([top, top, torch.zeros(())]))
    with torch.no_grad():
        model.alpha_normal.zero_()
        model.alpha_normal[:, 0] = 3.0
    before = model.alpha_normal.detach().clone()
    meta_step(c, None)  # outer step 1: no pruning yet
    assert (model.alpha_normal > -1e8).all()
    meta_step(c, None)  # outer step 2: every operation below 0.2 goes
    kept = torch.softmax(before, -1) >= 0.2  # (no temperature_end: the model's, 1)
    assert kept[:, 0].all() and not kept[:, 1:].any()
    assert (model.alpha_normal[:, 1:] == -1e9).all()
    assert (model.alpha_normal[:, 0] > -1e8).all()


@pytest.mark.slow
def test_drop_path_drops_whole_operation_outputs_per_example_while_adapting_to_training_tasks(
    float64,
) -> None:
    """model.drop_path: an edge scales each example's output of each non-identity operation
    by its factor (0, or 1 / keep), the identity whole; the masks come from each task's
    stream, so vmap and the loop agree; evaluation never drops."""
    names = ["conv_3x3", "skip_connect", "max_pool_3x3"]
    edge = Edge(names, 3, 1, False)
    x = torch.randn(4, 3, 6, 6)
    weights = torch.tensor([0.5, 0.3, 0.2])
    drop = torch.tensor([[2.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    by_hand = (
        0.5 * edge.ops[0](x) * drop[0].view(4, 1, 1, 1)
        + 0.3 * x  # the identity is never dropped
        + 0.2 * edge.ops[2](x) * drop[2].view(4, 1, 1, 1)
    )
    torch.testing.assert_close(edge(x, weights, drop), by_hand, rtol=1e-12, atol=1e-12)

    def run(drop_path: float, batching: str) -> tuple[Tensor, Tensor, Components]:
        torch.manual_seed(0)
        c = build(
            compose_config(
                *TINY, "algo=metanas", "algo.meta=fomaml", f"model.drop_path={drop_path}",
                f"algo.batching={batching}", "seed=3",
            )
        )  # fmt: skip
        batch = sample(c)
        c.algorithm.train()
        return c.algorithm.meta_loss(batch).loss.detach(), evaluate(c, "val", 4, 4).final, c

    dropped, evaluated, c = run(0.5, "vmap")
    looped, evaluated_loop, _ = run(0.5, "loop")
    plain, evaluated_plain, _ = run(0.0, "vmap")
    torch.testing.assert_close(dropped, looped, rtol=1e-10, atol=0)
    assert not torch.isclose(dropped, plain)  # the masks took part in the inner loop
    assert evaluated == evaluated_plain == evaluated_loop  # and not at evaluation
    masks = darts(c).drop_masks(TaskRandom(torch.tensor(5)), 1000, torch.float64)
    assert set(masks.unique().tolist()) == {0.0, 2.0}
    assert abs(float((masks == 0).double().mean()) - 0.5) < 0.01


def test_alternating_task_steps_are_the_codes_alpha_step_then_clipped_weight_step(
    float64,
) -> None:
    """algo.alternate: each inner step is an alpha step (gradient plus weight decay x alpha),
    then a weight step at the new alpha with its gradient's norm clipped, as MetaNAS's
    task optimizer (plain SGD here, on the whole support set, against autograd by hand)."""
    c = build(
        compose_config(
            *TINY, "algo=metanas", "algo.alternate=true", "algo.alpha_weight_decay=0.1",
            "algo.w_grad_clip=0.05", "algo.meta=fomaml",
        )
    )  # fmt: skip
    algorithm = c.algorithm
    assert isinstance(algorithm, MetaNAS)
    batch = sample(c)
    x, y = batch.support_x[0], batch.support_y[0]
    rng = TaskRandom(torch.tensor(7))
    params = {n: p.detach() for n, p in algorithm.initial_params().items()}
    steps = list(algorithm.adapt(params, x, y, 2, 0.1, True, rng))
    alphas = set(darts(c).architecture_names())

    def gradient(at: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
        leaves = {n: at[n].clone().requires_grad_() for n in names}
        loss = algorithm.support_loss({**at, **leaves}, x, y, 0, rng)
        return dict(zip(names, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    expected = dict(params)
    adapted = list(algorithm.adapted(params))
    for _ in range(2):
        names = [n for n in adapted if n in alphas]
        grads = gradient(expected, names)
        expected = {
            **expected,
            **{n: expected[n] - 0.1 * (grads[n] + 0.1 * expected[n]) for n in names},
        }
        names = [n for n in adapted if n not in alphas]
        grads = gradient(expected, names)
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        assert norm > 0.05  # the clip acts
        factor = 0.05 / (norm + 1e-6)
        expected = {**expected, **{n: expected[n] - 0.1 * factor * grads[n] for n in names}}
    for name in adapted:
        torch.testing.assert_close(steps[-1].params[name], expected[name], rtol=1e-10, atol=1e-12)
    losses = []
    for batching in ("vmap", "loop"):
        torch.manual_seed(0)
        d = build(
            compose_config(
                *TINY, "algo=metanas", "algo.alternate=true", "algo.alpha_weight_decay=0.1",
                "algo.w_grad_clip=0.05", "algo.meta=fomaml", f"algo.batching={batching}",
                "algo.inner_batch=3",
            )
        )  # fmt: skip
        losses.append(d.algorithm.meta_loss(sample(d)).loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=0)
