"""The sinusoid task distribution of Finn et al. 2017."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metacli.tasks.base import split_generator
from metacli.tasks.sinusoid import Sinusoid, SinusoidConfig
from tests.conftest import read_summary, run_cli


def test_shapes_ranges_and_one_function_per_task() -> None:
    task = Sinusoid(SinusoidConfig(shots=5, queries=15))
    batch = task.sample(1000, "train", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (1000, 5, 1) and batch.query_y.shape == (1000, 15, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1).squeeze(-1).double()
    y = torch.cat([batch.support_y, batch.query_y], 1).squeeze(-1).double()
    assert x.min() >= -5 and x.max() <= 5
    # Recover A and phi of every task from its 20 points by least squares on
    # y = a sin x + b cos x (a = A cos phi, b = -A sin phi): the fit must be exact.
    design = torch.stack([torch.sin(x), torch.cos(x)], -1)  # [T, 20, 2]
    coef = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    residual = (design @ coef.unsqueeze(-1)).squeeze(-1) - y
    assert residual.abs().max() < 1e-4
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    # Uniform over [0.1, 5] and [0, pi]: the means sit in the middle.
    assert abs(amplitude.mean().item() - 2.55) < 0.15
    assert abs(phase.mean().item() - math.pi / 2) < 0.1


def test_test_shots_apply_to_validation_and_test_only() -> None:
    task = Sinusoid(SinusoidConfig(shots=10, queries=10, test_shots=5))
    gen = torch.Generator().manual_seed(0)
    assert task.sample(2, "train", gen).support_x.shape[1] == 10
    assert task.sample(2, "val", gen).support_x.shape[1] == 5
    assert task.sample(2, "test", gen).support_x.shape[1] == 5


def test_split_streams_are_fixed_per_seed_and_distinct_per_split() -> None:
    task = Sinusoid(SinusoidConfig())
    val_a = task.sample(4, "val", split_generator(0, "val"))
    val_b = task.sample(4, "val", split_generator(0, "val"))
    test = task.sample(4, "test", split_generator(0, "test"))
    other_seed = task.sample(4, "val", split_generator(1, "val"))
    assert torch.equal(val_a.support_x, val_b.support_x)
    assert not torch.equal(val_a.support_x, test.support_x)
    assert not torch.equal(val_a.support_x, other_seed.support_x)


def test_loss_and_metric_are_mse() -> None:
    task = Sinusoid(SinusoidConfig())
    prediction, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    assert task.loss(prediction, target).item() == 2.5
    assert task.metric(prediction, target).item() == 2.5


def fit_amplitude_phase(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of y = a sin x + b cos x per task; returns (A, residual max)."""
    design = torch.stack([torch.sin(x), torch.cos(x)], -1).double()
    coef = torch.linalg.lstsq(design, y.double().unsqueeze(-1)).solution.squeeze(-1)
    residual = (design @ coef.unsqueeze(-1)).squeeze(-1) - y.double()
    return coef.norm(dim=-1), residual.abs().amax(dim=-1)


def test_frequency_and_noise_variants() -> None:
    gen = torch.Generator().manual_seed(0)
    varied = Sinusoid(SinusoidConfig(frequency=[0.8, 1.2])).sample(200, "train", gen)
    _, residual = fit_amplitude_phase(varied.support_x.squeeze(-1), varied.support_y.squeeze(-1))
    assert residual.max() > 1e-2  # w != 1: a unit-frequency sinusoid no longer fits exactly
    clean = Sinusoid(SinusoidConfig()).sample(50, "train", torch.Generator().manual_seed(1))
    noisy = Sinusoid(SinusoidConfig(noise=0.3)).sample(
        50, "train", torch.Generator().manual_seed(1)
    )
    assert torch.equal(clean.support_x, noisy.support_x)
    assert abs((noisy.support_y - clean.support_y).std().item() - 0.3) < 0.05


def test_non_mutually_exclusive_sinusoid_follows_the_authors_notebook() -> None:
    from metacli.tasks.sinusoid_nonexclusive import (
        NonExclusiveSinusoid,
        NonExclusiveSinusoidConfig,
    )

    task = NonExclusiveSinusoid(NonExclusiveSinusoidConfig(noise=0.0))
    batch = task.sample(400, "train", torch.Generator().manual_seed(0))
    assert task.input_shape == (21,) and batch.support_x.shape == (400, 10, 21)
    assert batch.query_x.shape == (400, 10, 21)
    one_hot = batch.support_x[..., 1:]
    assert torch.equal(one_hot.sum(-1), torch.ones(400, 10))
    assert torch.equal(one_hot, batch.query_x[..., 1:])  # one task, one index
    index = one_hot[:, 0].argmax(-1)
    assert set(index.tolist()) == set(range(16))  # training: the first 16 of 20 amplitudes
    x = batch.support_x[..., 0]
    expected = torch.linspace(0.1, 4.0, 20)[index].view(-1, 1) * torch.sin(x)  # phase 0
    assert torch.allclose(batch.support_y.squeeze(-1), expected, atol=1e-6)
    assert x.min() >= -5 and x.max() <= 5
    # test tasks: a continuous amplitude the one-hot says nothing about; K=5; a 200-point grid
    test = task.sample(2000, "test", torch.Generator().manual_seed(1))
    assert test.support_x.shape == (2000, 5, 21) and test.query_x.shape == (2000, 200, 21)
    assert torch.equal(test.query_x[0, :, 0], torch.linspace(-4.5, 4.5, 200))
    amplitude, residual = fit_amplitude_phase(test.query_x[..., 0], test.query_y.squeeze(-1))
    assert residual.max() < 1e-4 and amplitude.min() >= 0.1 and amplitude.max() <= 4.0
    on_the_grid = torch.linspace(0.1, 4.0, 20).double()
    assert (amplitude.unsqueeze(1) - on_the_grid).abs().min(1).values.max() > 0.05
    test_index = test.support_x[:, 0, 1:].argmax(-1)
    assert set(test_index.tolist()) == set(range(16))
    assert abs(torch.corrcoef(torch.stack([test_index.double(), amplitude]))[0, 1]) < 0.1
    # noise: 0.1 on training y and test queries; the test support set gets it twice
    noisy = NonExclusiveSinusoid(NonExclusiveSinusoidConfig())
    clean = task.sample(3000, "test", torch.Generator().manual_seed(2))
    dirty = noisy.sample(3000, "test", torch.Generator().manual_seed(2))
    assert abs((dirty.query_y - clean.query_y).std().item() - 0.1) < 0.005
    assert abs((dirty.support_y - clean.support_y).std().item() - 0.1 * 2**0.5) < 0.007


def test_fixed_labels_give_every_class_one_label_across_tasks() -> None:
    """task.labels=fixed: the non-mutually-exclusive classification tasks of Yin et al."""
    from metacli.tasks.base import choose_classes
    from metacli.tasks.synthetic import Synthetic, SyntheticConfig

    chosen = choose_classes(23, 5, 4000, "fixed", torch.Generator().manual_seed(0))
    assert torch.equal(chosen % 5, torch.arange(5).expand(4000, 5))  # label k: c mod 5 == k
    assert set(chosen.flatten().tolist()) == set(range(23))  # and every class is used
    shuffled = choose_classes(23, 5, 4000, "shuffled", torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled % 5, torch.arange(5).expand(4000, 5))
    assert all(len(set(row)) == 5 for row in shuffled.tolist())
    # through a task: one template (class) always carries the same label
    task = Synthetic(SyntheticConfig(ways=3, shots=1, queries=1, noise=0.0, labels="fixed"))
    batch = task.sample(300, "train", torch.Generator().manual_seed(1))
    label_of: dict[bytes, set[int]] = {}
    for x, y in zip(batch.support_x.flatten(0, 1), batch.support_y.flatten(), strict=True):
        label_of.setdefault(x.numpy().tobytes(), set()).add(int(y))
    assert len(label_of) > 3 and all(len(labels) == 1 for labels in label_of.values())


def test_the_notebooks_own_test_tasks() -> None:
    """task.test_tasks=notebook: task i is what the notebook draws after np.random.seed(i)
    (numpy's legacy generator: its seed-0 uniforms are 0.5488135, 0.71518937, ...), the same
    for every run; validation keeps sampled tasks."""
    from metacli.tasks.sinusoid_nonexclusive import (
        NonExclusiveSinusoid,
        NonExclusiveSinusoidConfig,
    )

    task = NonExclusiveSinusoid(NonExclusiveSinusoidConfig(test_tasks="notebook", noise=0.0))
    first = task.sample(3, "test", torch.Generator().manual_seed(0))
    again = task.sample(3, "test", torch.Generator().manual_seed(7))
    assert torch.equal(first.support_x[..., :1], again.support_x[..., :1])
    assert torch.equal(first.query_y, again.query_y)
    seed0 = torch.tensor([0.5488135039273248, 0.7151893663724195, 0.6027633760716439])
    seed0 = torch.cat([seed0, torch.tensor([0.5448831829968969, 0.4236547993389047])])
    amplitude = 0.1 + 3.9 * seed0[0]  # A = uniform(0.1, 4.0), then x reseeded
    torch.testing.assert_close(first.support_x[0, :, 0], -5 + 10 * seed0)
    torch.testing.assert_close(first.support_y[0, :, 0], amplitude * torch.sin(-5 + 10 * seed0))
    grid = torch.linspace(-4.5, 4.5, 200)
    torch.testing.assert_close(first.query_y[0, :, 0], amplitude * torch.sin(grid))
    assert first.support_x.shape == (3, 5, 21) and first.query_x.shape == (3, 200, 21)
    noisy = NonExclusiveSinusoid(NonExclusiveSinusoidConfig(test_tasks="notebook"))
    residual = (
        noisy.sample(100, "test", torch.Generator()).query_y
        - task.sample(100, "test", torch.Generator()).query_y
    )
    assert abs(residual.std().item() - 0.1) < 0.003
    val = noisy.sample(2, "val", torch.Generator().manual_seed(0))
    assert not torch.equal(val.support_x[..., :1], first.support_x[:2, :, :1])


# Measured on this project's 2-core machine (torch 2.13, seed 0): 3.012 before adaptation,
# 1.165 +- 0.134 after 10 steps; the band allows for other machines' float rounding.
SHORT_PRESET_BAND = (0.95, 1.40)


@pytest.mark.slow  # 3,000 iterations of the paper preset, about 40 s: make test-full
def test_a_short_run_of_the_maml_sinusoid_preset_stays_in_its_stored_band(
    tmp_path: Path,
) -> None:
    run_cli("train", "experiment=maml_sinusoid", "train.iterations=3000", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "train").glob("*/*")
    summary = read_summary(run_dir)
    test = summary["test"]
    assert test["num_tasks"] == 600 and test["inner_steps"] == 10
    assert 2.8 < test["before_adaptation"]["mean"] < 3.2  # K=5 test tasks, A in [0.1, 5]
    low, high = SHORT_PRESET_BAND
    assert low < test["mean"] < high, test["mean"]
    assert summary["test_last"]["checkpoint_iteration"] == 3000
