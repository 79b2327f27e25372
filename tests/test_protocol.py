"""The papers' protocols: each setting that makes metacli follow a reference code, checked
against that code's rule written out by hand (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.engine.inner import last
from metacli.models.conv4 import Conv4, Conv4Config
from metacli.streams import TaskRandom
from metacli.tasks.synthetic import Synthetic, SyntheticConfig
from tests.test_algorithms import double

pytestmark = pytest.mark.usefixtures("float64")

WAYS, SHOTS, ALPHA = 5, 2, 0.4


def omniglot_like() -> tuple[Synthetic, Conv4, torch.Tensor, torch.Tensor]:
    task = Synthetic(SyntheticConfig(ways=WAYS, shots=SHOTS, queries=1, image_size=16, classes=12))
    torch.manual_seed(0)
    model = Conv4(Conv4Config(filters=4), task.input_shape, WAYS).double()
    batch = double(task.sample(1, "train", torch.Generator().manual_seed(2)))
    return task, model, batch.support_x[0], batch.support_y[0]


def one_step(algo: MAML, model: Conv4, x: torch.Tensor, y: torch.Tensor) -> dict:
    params = dict(model.named_parameters())
    rng = TaskRandom(torch.tensor(0))
    return last(algo.adapt(params, x, y, 1, algo.train_lr, False, rng)).params


@pytest.mark.parametrize("inner_loss", ["mean", "sum", "sum_over_shots"])
def test_one_inner_step_equals_the_reference_update(inner_loss: str) -> None:
    """cbfinn/maml's xent is softmax_cross_entropy(pred, label) / update_batch_size per
    example, and tf.gradients sums it: the step is alpha * grad(sum_i CE_i / K)."""
    task, model, x, y = omniglot_like()
    algo = MAML(MAMLConfig(inner_lr=ALPHA, inner_loss=inner_loss), model, task)
    ours = one_step(algo, model, x, y)
    per_example = F.cross_entropy(model(x), y, reduction="none")  # [N*K]
    reference_loss = {
        "mean": per_example.mean(),
        "sum": per_example.sum(),
        "sum_over_shots": per_example.sum() / SHOTS,
    }[inner_loss]
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(reference_loss, [p for _, p in model.named_parameters()])
    for name, p, g in zip(names, model.parameters(), grads, strict=True):
        torch.testing.assert_close(ours[name], p - ALPHA * g, rtol=1e-12, atol=1e-12)
    # The reference's step is N times metacli's default (mean) step.
    mean = one_step(MAML(MAMLConfig(inner_lr=ALPHA), model, task), model, x, y)
    scaled = MAMLConfig(inner_lr=ALPHA / WAYS, inner_loss="sum_over_shots")
    shots = one_step(MAML(scaled, model, task), model, x, y)
    for name in names:
        torch.testing.assert_close(mean[name], shots[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapt_norm", [True, False])
def test_adapt_norm_keeps_batch_norm_parameters_out_of_the_inner_loop(adapt_norm: bool) -> None:
    task, model, x, y = omniglot_like()
    algo = MAML(MAMLConfig(inner_lr=ALPHA, adapt_norm=adapt_norm), model, task)
    adapted = one_step(algo, model, x, y)
    norm = set(model.norm_names())
    assert norm == {f"blocks.{i}.norm.{p}" for i in range(4) for p in ("weight", "bias")}
    for name, value in model.named_parameters():
        changed = not torch.equal(adapted[name], value)
        assert changed == (adapt_norm or name not in norm), name
    # ... and the meta-gradient still reaches them through the adapted weights.
    loss = F.cross_entropy(algo.forward_with(adapted, x), y)
    grad = torch.autograd.grad(loss, model.blocks[0].norm.weight)[0]
    assert grad.abs().sum() > 0


def test_cosine_schedule_per_epoch_follows_mamlpp_reference_code() -> None:
    """MAML++'s code: CosineAnnealingLR(T_max=epochs, eta_min).step(epoch=it // per_epoch),
    whose closed form is eta_min + (lr - eta_min) (1 + cos(pi epoch / T_max)) / 2."""
    from metacli.build import make_scheduler
    from metacli.config import OptimConfig

    cfg = OptimConfig(lr=1e-3, scheduler="cosine", min_lr=1e-5, epoch_iterations=5)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(()))], lr=cfg.lr)
    scheduler = make_scheduler(cfg, optimizer, iterations=20)  # 4 epochs
    assert scheduler is not None
    rates = []
    for it in range(20):
        epoch = it // 5
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 4)) / 2
        rates.append(optimizer.param_groups[0]["lr"])
        assert abs(rates[-1] - expected) < 1e-15, it
        optimizer.step()
        scheduler.step()
    assert rates[0] == rates[4] == 1e-3 and rates[5] < rates[4] and rates[19] > 1e-5


def test_grad_clamp_clamps_each_meta_gradient_element() -> None:
    from metacli.build import build
    from metacli.loop import meta_step
    from tests.conftest import compose_config

    def gradients(*extra: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        c = build(compose_config("debug=tiny", "device=cpu", *extra))
        step = meta_step(c, c.run.train.grad_clip, c.run.train.grad_clamp)
        assert not isinstance(step, str)
        return [p.grad.clone() for p in c.algorithm.parameters() if p.grad is not None]

    free, clamped = gradients(), gradients("train.grad_clamp=0.05")
    assert max(g.abs().max().item() for g in free) > 0.05  # the clamp acts here
    for g, h in zip(free, clamped, strict=True):
        torch.testing.assert_close(h, g.clamp(-0.05, 0.05))


def test_metasgd_rates_start_uniform_as_in_the_paper() -> None:
    from metacli.build import build
    from tests.conftest import compose_config

    def rates(*extra: str) -> torch.Tensor:
        c = build(compose_config("debug=tiny", "device=cpu", "algo=metasgd", *extra))
        return torch.cat([r.detach().flatten() for r in c.algorithm.learned_rates().values()])

    uniform = rates("algo.metasgd_init=[0.005,0.1]")
    assert uniform.numel() == 1761 and uniform.min() >= 0.005 and uniform.max() <= 0.1
    assert abs(uniform.mean().item() - 0.0525) < 0.003  # U[0.005, 0.1]'s mean, 1,761 draws
    assert abs(uniform.std().item() - 0.095 / math.sqrt(12)) < 0.003
    assert torch.equal(uniform, rates("algo.metasgd_init=[0.005,0.1]"))  # seeded by the run
    assert torch.equal(rates(), torch.full((1761,), 0.01))  # null: algo.inner_lr everywhere


def test_norm_scale_false_learns_a_bias_only_as_mamls_tf_batch_norm() -> None:
    """tf.contrib.layers.batch_norm(center=True, scale=False): (x - mean) / sqrt(var + eps)
    + beta, with the batch's statistics."""
    task = Synthetic(SyntheticConfig(ways=WAYS, shots=SHOTS, queries=1, image_size=16))
    torch.manual_seed(0)
    model = Conv4(Conv4Config(filters=4, norm_scale=False), task.input_shape, WAYS).double()
    names = [n for n, _ in model.named_parameters()]
    assert "blocks.0.norm.bias" in names and not any(n.endswith("norm.weight") for n in names)
    assert model.norm_names() == [f"blocks.{i}.norm.bias" for i in range(4)]
    norm = model.blocks[0].norm
    with torch.no_grad():
        norm.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_test_queries_apply_to_validation_and_test_only() -> None:
    task = Synthetic(
        SyntheticConfig(ways=3, shots=1, queries=2, test_queries=5, image_size=8, classes=12)
    )
    gen = torch.Generator().manual_seed(0)
    assert task.sample(2, "train", gen).query_x.shape[:2] == (2, 3 * 2)
    for split in ("val", "test"):
        batch = task.sample(2, split, gen)
        assert batch.query_x.shape[:2] == (2, 3 * 5) and batch.support_x.shape[1] == 3


# HowToTrainYourMAMLPytorch's experiment_config/{omniglot_maml++-omniglot_<shots>_8_0.1_64_5_0,
# mini-imagenet_maml++-mini-imagenet_<shots>_2_0.01_48_5_0}.json: batch_size, num_classes_per_set,
# num_samples_per_class, num_target_samples, init_inner_loop_learning_rate,
# number_of_training/evaluation_steps_per_iter, multi_step_loss_num_epochs x
# total_iter_per_epoch, meta_learning_rate, min_learning_rate, total_epochs x
# total_iter_per_epoch, cnn_num_filters, max_pooling, enable_inner_loop_optimizable_bn_params
# (false), first_order_to_second_order_epoch (-1), num_evaluation_tasks, max_models_to_save.
MAMLPP_CODE = {
    "omniglot": {
        "train.meta_batch_size": 8, "task.ways": 5, "task.queries": 1, "algo.inner_lr": 0.1,
        "algo.inner_steps": 5, "algo.test_inner_steps": 5, "algo.msl_iterations": 10 * 500,
        "optim.lr": 0.001, "optim.min_lr": 1e-5, "train.iterations": 100 * 500,
        "optim.epoch_iterations": 500, "model.filters": 64, "model.strided": False,
        "algo.adapt_norm": False, "algo.first_order_iterations": 0, "test.num_tasks": 600,
        "test.ensemble_top_k": 5, "val.num_tasks": 600, "train.val_every": 500,
    },
    "miniimagenet": {
        "train.meta_batch_size": 2, "task.ways": 5, "task.queries": 15, "algo.inner_lr": 0.01,
        "algo.inner_steps": 5, "algo.test_inner_steps": 5, "algo.msl_iterations": 15 * 500,
        "optim.lr": 0.001, "optim.min_lr": 0.001, "train.iterations": 100 * 500,
        "optim.epoch_iterations": 500, "model.filters": 48, "model.strided": False,
        "algo.adapt_norm": False, "algo.first_order_iterations": 0, "test.num_tasks": 600,
        "test.ensemble_top_k": 5, "val.num_tasks": 600, "train.val_every": 500,
    },
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(MAMLPP_CODE))
@pytest.mark.parametrize("shots", [1, 5])
def test_mamlpp_presets_are_the_reference_experiment_configs(task: str, shots: int) -> None:
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    cfg = compose_config(f"experiment=mamlpp_{task}_5w{shots}s")
    assert cfg.task.shots == shots
    for key, value in MAMLPP_CODE[task].items():
        assert OmegaConf.select(cfg, key) == value, (task, shots, key)
