"""The few-shot baselines (issue 35): each head against an independent implementation.

R2D2's and MetaOptNet's ridge heads against the primal closed form; MetaOptNet's SVM
against a generic constrained solver (scipy's SLSQP) on the same dual; Matching and
Relation Networks batched over tasks against one task at a time; Baseline's and
Baseline++'s batched fine-tuning against a per-task torch.optim.SGD loop of
CloserLookFewShot's structure; RFS against scikit-learn on normalised features; and the
non-episodic training batches, distillation generations and the refusals.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

import metacli
from metacli import tables
from metacli.algorithms.baseline import cosine_scale, linear_init
from metacli.algorithms.heads import ridge_scores
from metacli.algorithms.metaoptnet import svm_cs_dual
from metacli.build import build
from metacli.contract import IMAGES as CONTRACT_IMAGES
from metacli.loop import sample
from metacli.streams import TaskRandom, task_keys
from tests.conftest import compose_config

IMAGES = (
    *CONTRACT_IMAGES,  # 3-way 2-shot synthetic 16 x 16 images, 8 classes a split
    "model=conv4",
    "model.filters=4",
    "device=cpu",
    "train.meta_batch_size=3",
)


def components(algo: str, *overrides: str):  # type: ignore[no-untyped-def]
    return build(compose_config(f"algo={algo}", *IMAGES, *overrides))


@pytest.mark.parametrize("bias", [False, True])
def test_ridge_woodbury_and_primal_forms_equal_the_normal_equations(float64, bias: bool) -> None:
    torch.manual_seed(0)
    for examples, dim in ((4, 9), (12, 5)):  # the Woodbury form, then the primal one
        x, y, q = torch.randn(2, examples, dim), torch.randn(2, examples, 3), torch.randn(2, 4, dim)
        scores = ridge_scores(x, y, 0.7, q, bias=bias, scale=0.5)
        for t in range(2):
            a, b = x[t].numpy(), q[t].numpy()
            if bias:
                a, b = np.hstack([a, np.ones((examples, 1))]), np.hstack([b, np.ones((4, 1))])
            a = 0.5 * a
            w = np.linalg.solve(a.T @ a + 0.7 * np.eye(a.shape[1]), a.T @ y[t].numpy())
            np.testing.assert_allclose(scores[t].numpy(), b @ w, rtol=1e-9, atol=1e-11)


def test_metaoptnet_proto_head_is_the_codes_normalised_distance(float64) -> None:
    c = components("metaoptnet", "algo.head=proto")
    with torch.no_grad():
        c.algorithm.scale["scale"].fill_(2.0)
    torch.manual_seed(4)
    support, query = torch.randn(2, 6, 7), torch.randn(2, 4, 7)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 1, 1]])
    scores = c.algorithm.head(support, labels, query, 3)
    for t in range(2):  # ProtoNetHead(normalize=True): -|q - mean of the class|^2 / d
        x = support[t].numpy()
        means = np.stack([x[labels[t].numpy() == k].mean(0) for k in range(3)])
        distance = ((query[t].numpy()[:, None] - means[None]) ** 2).sum(-1)
        np.testing.assert_allclose(scores[t].detach().numpy(), -2.0 * distance / 7, rtol=1e-9)


def test_r2d2_head_is_bertinetto_ridge_regression_with_bias_and_adjust(float64) -> None:
    c = components("r2d2", "algo.lam=3.0", "algo.adj_scale=2.0", "algo.adj_bias=0.5")
    torch.manual_seed(1)
    support, query = torch.randn(2, 6, 5), torch.randn(2, 4, 5)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    scores = c.algorithm.head(support, labels, query, 3)
    for t in range(2):  # RRNet.rr_standard with the ones column, inputs / sqrt(S)
        xs = np.hstack([support[t].numpy(), np.ones((6, 1))]) / math.sqrt(6)
        ys = np.eye(3)[labels[t].numpy()] / math.sqrt(6)
        wb = np.linalg.inv(xs.T @ xs + 3.0 * np.eye(6)) @ xs.T @ ys
        expected = 2.0 * (query[t].numpy() @ wb[:5] + wb[5]) + 0.5
        np.testing.assert_allclose(scores[t].detach().numpy(), expected, rtol=1e-9, atol=1e-10)


def crammer_singer_by_slsqp(x: np.ndarray, y: np.ndarray, ways: int, c: float) -> np.ndarray:
    """The dual of MetaOptNetHead_SVM_CS by a generic solver: alpha [S, ways]."""
    n = len(y)
    onehot = np.eye(ways)[y]
    kernel = x @ x.T

    def objective(a: np.ndarray) -> float:
        alpha = a.reshape(n, ways)
        return 0.5 * np.trace(alpha.T @ kernel @ alpha) - (alpha * onehot).sum()

    def gradient(a: np.ndarray) -> np.ndarray:
        return (kernel @ a.reshape(n, ways) - onehot).ravel()

    constraints = [
        {"type": "eq", "fun": lambda a: a.reshape(n, ways).sum(1)},
        {"type": "ineq", "fun": lambda a: (c * onehot - a.reshape(n, ways)).ravel()},
    ]
    result = minimize(
        objective,
        np.zeros(n * ways),
        jac=gradient,
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success, result.message
    return result.x.reshape(n, ways)


def test_metaoptnet_svm_dual_matches_a_generic_qp_solver(float64) -> None:
    pytest.importorskip("qpth")
    torch.manual_seed(2)
    x = torch.randn(2, 6, 10)  # more features than examples, as CNN features
    y = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    alpha = svm_cs_dual(x, y, 3, 0.1, iterations=50)
    for t in range(2):
        expected = crammer_singer_by_slsqp(x[t].numpy(), y[t].numpy(), 3, 0.1)
        np.testing.assert_allclose(alpha[t].numpy(), expected, atol=2e-5)
    assert (alpha.sum(-1).abs() < 1e-8).all()  # the equality constraint
    # three iterations (the code's test setting) already classify as the optimum does
    early = svm_cs_dual(x, y, 3, 0.1, iterations=3)
    assert torch.equal(
        (x @ x.transpose(1, 2) @ early).argmax(-1), (x @ x.transpose(1, 2) @ alpha).argmax(-1)
    )


def test_metaoptnet_ridge_head_is_twice_the_closed_form_times_the_scale(float64) -> None:
    c = components("metaoptnet", "algo.head=ridge", "algo.lam=2.0")
    with torch.no_grad():
        c.algorithm.scale["scale"].fill_(3.0)
    torch.manual_seed(3)
    support, query = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]])
    scores = c.algorithm.head(support, labels, query, 3)
    xs, ys = support[0].numpy(), np.eye(3)[labels[0].numpy()]
    # MetaOptNetHead_Ridge's QP: min 1/2 z^T (K + lam I) z - 2 y^T z, z = 2 (K + lam I)^-1 Y
    z = np.linalg.solve(xs @ xs.T + 2.0 * np.eye(6), 2 * ys)
    np.testing.assert_allclose(
        scores[0].detach().numpy(), 3.0 * query[0].numpy() @ xs.T @ z, rtol=1e-9
    )


def test_metaoptnet_label_smoothing_is_train_py_s() -> None:
    c = components("metaoptnet", "algo.head=ridge", "algo.label_smoothing=0.1")
    scores, labels = torch.randn(2, 4, 3), torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0]])
    target = F.one_hot(labels, 3).float() * 0.9 + (1 - F.one_hot(labels, 3).float()) * 0.05
    expected = -(target * scores.log_softmax(-1)).sum(-1).mean(-1)
    torch.testing.assert_close(c.algorithm.training_losses(scores, labels, 3), expected)


@pytest.mark.parametrize("fce", [True, False])
def test_matchingnet_batched_over_tasks_equals_one_task_at_a_time(float64, fce: bool) -> None:
    c = components("matchingnet", f"algo.fce={str(fce).lower()}")
    torch.manual_seed(4)
    dim = c.algorithm.model.feature_dim
    support, query = torch.randn(3, 6, dim), torch.randn(3, 4, dim)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 3)
    batched = c.algorithm.head(support, labels, query, 3)
    for t in range(3):
        alone = c.algorithm.head(support[t : t + 1], labels[t : t + 1], query[t : t + 1], 3)
        torch.testing.assert_close(batched[t : t + 1], alone)
    if not fce:  # plain attention: softmax over 100 x relu(cosine), labels mixed, log

        def unit(x: torch.Tensor) -> torch.Tensor:  # the code's x / (||x|| + 1e-5)
            return x / (x.norm(dim=-1, keepdim=True) + 1e-5)

        cos = unit(query) @ unit(support).transpose(1, 2)
        expected = ((100 * cos.relu()).softmax(-1) @ F.one_hot(labels, 3).double() + 1e-6).log()
        torch.testing.assert_close(batched, expected, rtol=1e-6, atol=1e-6)
    # the probabilities sum to one (up to the code's 1e-6 per class)
    torch.testing.assert_close(batched.exp().sum(-1), torch.full((3, 4), 1 + 3e-6))


def test_relationnet_batched_over_tasks_equals_one_task_at_a_time(float64) -> None:
    c = components("relationnet", "model.pool_blocks=2")
    torch.manual_seed(5)
    shape = c.algorithm.map_shape
    support, query = torch.randn(3, 6, math.prod(shape)), torch.randn(3, 4, math.prod(shape))
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 3)
    batched = c.algorithm.head(support, labels, query, 3)
    assert batched.shape == (3, 4, 3) and ((batched > 0) & (batched < 1)).all()  # sigmoid
    for t in range(3):  # each task's batch norm statistics are its own
        alone = c.algorithm.head(support[t : t + 1], labels[t : t + 1], query[t : t + 1], 3)
        torch.testing.assert_close(batched[t : t + 1], alone)
    # summed shots (floodsung's code): a class's maps are the sum of its two shots
    targets = F.one_hot(torch.tensor([[0, 1, 2, 0]] * 3), 3).double()
    loss = c.algorithm.episode_losses(batched, targets.argmax(-1), 3)
    torch.testing.assert_close(loss, (batched - targets).square().mean(dim=(1, 2)))


def finetune_reference(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    ways: int,
    rng: TaskRandom,
    cosine: bool,
    epochs: int,
) -> torch.Tensor:
    """BaselineFinetune.set_forward_adaptation for one task (nn.Linear or distLinear, SGD
    lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001, batches of 4)."""
    dim = support.shape[1]
    weight, bias = linear_init(1, ways, dim, [rng])
    layer = nn.Linear(dim, ways, bias=not cosine).to(support.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight[0])
        if not cosine:
            layer.bias.copy_(bias[0])
    if cosine:
        layer = torch.nn.utils.weight_norm(layer, "weight", dim=0)

    def scores(x: torch.Tensor) -> torch.Tensor:
        if cosine:
            x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
            return cosine_scale(ways) * layer(x)
        return layer(x)

    optimizer = torch.optim.SGD(
        layer.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001
    )
    for _ in range(epochs):
        order = rng.uniform((len(support),)).argsort()
        for start in range(0, len(support), 4):
            pick = order[start : start + 4]
            loss = F.cross_entropy(scores(support[pick]), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return scores(query)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # (the code's WeightNorm)
@pytest.mark.parametrize("algo", ["baseline", "baselinepp"])
def test_baseline_batched_finetuning_equals_per_task_sgd(float64, algo: str) -> None:
    c = components(algo, "algo.finetune_epochs=7")
    torch.manual_seed(6)
    support, query = torch.randn(3, 10, 12), torch.randn(3, 5, 12)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]] * 3)
    keys = task_keys(0, "test", 0, 0, 3)
    batched = c.algorithm.task_scores(support, labels, query, 3, [TaskRandom(k) for k in keys])
    for t in range(3):
        expected = finetune_reference(
            support[t], labels[t], query[t], 3, TaskRandom(keys[t]), algo == "baselinepp", 7
        )
        torch.testing.assert_close(batched[t], expected, rtol=1e-9, atol=1e-9)
    assert (batched.argmax(-1) != batched[:, :, :1].argmax(-1)).any()  # it learned something


def test_rfs_logistic_regression_on_normalised_features_is_scikit_learn_s(float64) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    c = components("rfs")
    torch.manual_seed(7)
    support, query = torch.randn(2, 6, 5) * 4, torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    scores = c.algorithm.task_scores(support, labels, query, 3, [])
    for t in range(2):
        s = F.normalize(support[t], dim=-1).numpy()
        q = F.normalize(query[t], dim=-1).numpy()
        clf = sklearn.LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(s, labels[t])
        np.testing.assert_allclose(scores[t].numpy(), clf.predict_log_proba(q), rtol=1e-8)


def test_non_episodic_batches_carry_global_labels_of_the_training_classes() -> None:
    c = components("baseline", "algo.batch_size=32", "algo.augment=false")
    batch = sample(c)
    assert batch.support_x.shape == (1, 32, 1, 16, 16) and batch.query_x.shape[1] == 0
    labels = batch.support_y[0]
    assert labels.max() < 8 and len(labels.unique()) > 3  # 8 training classes, global
    # each image is its class's template plus noise: nearest template is its label
    templates = c.task.templates["train"].flatten(1)
    distance = torch.cdist(batch.support_x[0].flatten(1), templates)
    assert (distance.argmin(1) == labels).float().mean() > 0.9
    assert c.algorithm.classifier.weight.shape == (8, c.algorithm.feature_dim)


def test_augmentation_crops_and_flips_and_jitters_colour() -> None:
    from metacli.tasks.images import augmented

    images = torch.rand(64, 3, 84, 84)
    out = augmented(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    gray = augmented(images[:, :1], torch.Generator().manual_seed(0))
    # grey images: crops and flips only, so every output pixel is an input pixel or padding
    values = set(images[:, :1].flatten().tolist()) | {0.0}
    assert set(gray.flatten().tolist()) <= values


def test_rfs_generation_boundary_freezes_a_teacher_and_restarts_the_student() -> None:
    c = components("rfs", "algo.distill_generations=1", "algo.batch_size=4", "train.iterations=4")
    algo = c.algorithm
    assert algo.cfg.generation_iterations == 2
    before = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
    for _ in range(2):
        loss = algo.meta_loss(sample(c))
        loss.loss.backward()
        with torch.no_grad():
            for p in algo.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
        trained = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
        algo.observe(sample(c))
    assert int(algo.generation) == 1
    for name, p in algo.teacher["model"].named_parameters():
        torch.testing.assert_close(p, trained[name])  # the teacher is the trained student
        assert not p.requires_grad
    student = dict(algo.model.named_parameters())
    assert not torch.equal(student["blocks.0.conv.weight"], trained["blocks.0.conv.weight"])
    assert not torch.equal(student["blocks.0.conv.weight"], before["blocks.0.conv.weight"])
    out = algo.meta_loss(sample(c))
    assert set(out.terms) == {"ce", "kd"} and out.terms["kd"] > 0
    assert "teacher" not in algo.param_groups()


def test_wrong_settings_are_named() -> None:
    from metacli.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("model.pool_blocks=2")):
        components("relationnet", "model.pool_blocks=4")  # 16 px maps pooled to 1 x 1
    with pytest.raises(ConfigError, match=re.escape("algo.head")):
        components("metaoptnet", "algo.head=lasso")
    with pytest.raises(ConfigError, match=re.escape("algo.batch_size")):
        components("baseline", "algo.batch_size=100000000")
    with pytest.raises(ConfigError, match="not a classification task"):
        build(compose_config("algo=baseline", "task=sinusoid", "model=mlp", "device=cpu"))


def test_every_baseline_learns_and_compare_pairs_them_with_protonets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Short runs on the same synthetic tasks: each learns well above chance (1/3), and
    `metacli compare` pairs every row with ProtoNets' task by task (the same fixed test
    tasks: they depend on the seed and split alone)."""
    common = [*IMAGES, "train.val_every=30", "val.num_tasks=10"]
    common += ["test.num_tasks=40", "threads=1", "model.filters=16"]
    runs = {  # (Relation Networks first fit the mean relation, then discriminate)
        "protonet": ["algo=protonet"],
        "r2d2": ["algo=r2d2", "algo.adj_scale=10"],
        "metaoptnet": ["algo=metaoptnet"],
        "metaoptnet_ridge": ["algo=metaoptnet", "algo.head=ridge"],
        "matchingnet": ["algo=matchingnet"],
        "relationnet": ["algo=relationnet", "model.pool_blocks=2", "train.iterations=100"],
        "baseline": ["algo=baseline", "algo.finetune_epochs=20"],
        "baselinepp": ["algo=baselinepp", "algo.finetune_epochs=20", "train.iterations=200"],
        "rfs": ["algo=rfs"],
    }
    for name, chosen in runs.items():
        overrides = [*common, "train.iterations=30", *chosen]
        summary = metacli.train(overrides, run_dir=tmp_path / name)
        assert summary["test"]["mean"] > 0.6, (name, summary["test"]["mean"])
    capsys.readouterr()  # (the runs' own output)
    assert tables.main([str(tmp_path), "--baseline", "algo=protonet", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == len(runs)
    for row in rows:
        if row["algo"] != "protonet":
            assert (row["pairs"], row["pairs_of"]) == (40, "tasks"), row["algo"]


@pytest.mark.parametrize(
    "algo", ["matchingnet", "relationnet", "r2d2", "metaoptnet", "baseline", "baselinepp", "rfs"]
)
def test_each_method_runs_on_resnet12(algo: str) -> None:
    """Every backbone that exists: ResNet-12 (its maps kept for Relation Networks)."""
    extra = ["model.readout=flatten", "task.image_size=64"] if algo == "relationnet" else []
    images = [o for o in IMAGES if not o.startswith(("model", "task.image_size"))]
    overrides = ["model=resnet12", "model.widths=[2,2,2,3]", "task.image_size=32", *extra]
    c = build(compose_config(f"algo={algo}", *images, *overrides))
    out = c.algorithm.meta_loss(sample(c))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in c.algorithm.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    c.algorithm.eval()
    tasks = c.task.sample(2, "val", torch.Generator().manual_seed(0))
    tasks = tasks.with_keys(task_keys(0, "val", 0, 0, 2))
    evaluation = c.algorithm.evaluate(tasks)
    assert evaluation.metric.shape == (2, 1) and torch.isfinite(evaluation.loss).all()


def test_distributed_training_refuses_mini_batches_of_images_with_the_fix() -> None:
    from metacli.errors import MetacliError
    from metacli.loop import distributed_objective

    c = components("baseline")
    with pytest.raises(MetacliError, match=re.escape("distributed.nproc=1")):
        distributed_objective(c, sample(c))


def test_diverged_embeddings_give_nan_scores_for_that_task_alone(float64) -> None:
    """A task whose features are NaN is data (a diverged task), not a crash of qpth's
    Cholesky or of scikit-learn's input check; the other tasks are solved as before."""
    torch.manual_seed(8)
    support, query = torch.randn(2, 6, 10), torch.randn(2, 4, 10)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    broken = support.clone()
    broken[0, 0, 0] = float("nan")
    svm = components("metaoptnet").algorithm
    scores = svm.head(broken, labels, query, 3)
    assert scores[0].isnan().all() and torch.isfinite(scores[1]).all()
    torch.testing.assert_close(scores[1], svm.head(support[1:], labels[1:], query[1:], 3)[0])
    rfs = components("rfs").algorithm
    scores = rfs.task_scores(broken, labels, query, 3, [])
    assert scores[0].isnan().all() and torch.isfinite(scores[1]).all()


def test_metaoptnet_retries_a_failed_qp_batch_task_by_task_then_reports_it_diverged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import metacli.algorithms.metaoptnet as metaoptnet

    solved = []

    def flaky(support, support_y, ways, c_reg, iterations):  # type: ignore[no-untyped-def]
        solved.append((len(support), support.dtype))
        if len(support) > 1 or (support[0, 0, 0] > 0 and support.dtype != torch.float64):
            raise RuntimeError("Pivots given to lu_solve must all be greater or equal to 1")
        if support[0, 0, 1] > 0:  # this task fails in float64 too
            raise RuntimeError("singular")
        return torch.ones(1, support_y.shape[1], ways, dtype=support.dtype)

    monkeypatch.setattr(metaoptnet, "svm_cs_dual", flaky)
    support = torch.tensor([[[-1.0, -1.0]], [[1.0, -1.0]], [[1.0, 1.0]]])  # [3 tasks, 1, 2]
    labels = torch.zeros(3, 1, dtype=torch.long)
    alpha = metaoptnet.robust_dual(support, labels, 2, metaoptnet.MetaOptNetConfig(), 3)
    assert solved == [
        (3, torch.float32),  # the batch fails
        (1, torch.float32),  # task 0 alone: solved
        (1, torch.float32),  # task 1 alone fails, then in float64: solved
        (1, torch.float64),
        (1, torch.float32),  # task 2 fails both ways: NaN, reported as diverged
        (1, torch.float64),
    ]
    assert alpha.dtype == torch.float32 and torch.equal(alpha[:2], torch.ones(2, 1, 2))
    assert alpha[2].isnan().all()
