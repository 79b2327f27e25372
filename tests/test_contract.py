"""The contract every registered algorithm meets; a new algorithm is covered by registering it.

For each algorithm of ``metacli.algorithms`` (and ``noisy``, a test algorithm that draws
noise inside every task; MAML with the optimizer space, drawn per task or in expectation;
MetaNAS with architectures drawn per task): the three batching strategies give the same
meta-gradients in float64 on a Conv-4 (MetaNAS: a small search network) with batch norm;
a checkpoint round trip restores every state; 2N iterations equal N, a resume and N more;
the same seed gives the same numbers; and where the meta-gradient is the true gradient of
the meta-loss, it matches central finite differences (and, where it is first order,
differs from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig, TaskLoss
from metacli.build import Components, build
from metacli.checkpoint import LoopState, load_checkpoint, restore, save_checkpoint
from metacli.loop import meta_train, sample
from metacli.params import Params
from metacli.registry import available
from metacli.streams import TaskRandom
from tests.conftest import compose_config
from tests.test_engine import Recorder


@dataclass
class NoisyConfig(MAMLConfig):
    name: str = "noisy"
    sigma: float = 0.1


class Noisy(MAML, key="noisy"):
    """Test-only: stochastic weights per task and noisy support inputs at every inner step,
    all drawn from the task's own random stream."""

    Config: ClassVar[type[AlgoConfig]] = NoisyConfig
    cfg: NoisyConfig
    stochastic = True

    def task_loss(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> TaskLoss:
        sigma = self.cfg.sigma
        noisy = {n: p + sigma * rng.normal(tuple(p.shape), p.dtype) for n, p in params.items()}
        return super().task_loss(rng, noisy, sx, sy, qx, qy)

    def support_loss(
        self, params: Params, x: Tensor, y: Tensor, step: int, rng: TaskRandom
    ) -> Tensor:
        noise = self.cfg.sigma * rng.normal(tuple(x.shape), x.dtype)
        return super().support_loss(params, x + noise, y, step, rng)


ALGOS = [
    *available("algo"),
    *("noisy", "mrmaml-activations", "space", "space-expectation", "metanas-gumbel"),
]
CONV4 = (
    "task=synthetic",
    "model=conv4",
    "model.filters=3",
    "task.image_size=16",
    "task.ways=3",
    "task.shots=2",
    "task.queries=2",
    "task.classes=8",
)
SMOOTH = (  # tanh MLP on tiny images: smooth, so finite differences are exact
    "task=synthetic",
    "model=mlp",
    "model.hidden=[3]",
    "model.activation=tanh",
    "task.image_size=4",
    "task.ways=3",
    "task.shots=2",
    "task.queries=2",
    "task.classes=8",
)


# MR-MAML puts its own (fully connected) encoder before the model, so its model is an MLP
# head on the bottleneck: no batch norm there.
ENCODED = {
    "CONV4": ("model=mlp", "model.hidden=[4]", "algo.encoder=[5]"),
    "SMOOTH": ("algo.activation=tanh", "algo.encoder=[2]"),  # few weights to perturb
}


SEARCH = (  # two cells (the second a reduction), two nodes, 2 channels
    "model=darts",
    "model.channels=2",
    "model.cells=2",
    "model.nodes=2",
    "model.reductions=[1]",
    "model.stem_multiplier=1",
)

SEARCH_SMOOTH = (  # one cell of one node: few weights to perturb
    "model=darts",
    "model.channels=1",
    "model.cells=1",
    "model.nodes=1",
    "model.reductions=[]",
    "model.stem_multiplier=1",
    "model.ops=[conv_3x3,skip_connect]",
)


def config(algo: str, *overrides: str, workload: tuple[str, ...] = CONV4) -> list[str]:
    inner = [] if algo == "protonet" else ["algo.inner_steps=2", "algo.inner_lr=0.1"]
    inner += ["algo.test_inner_steps=2"] if algo not in ("protonet",) else []
    name = ["algo=maml", "algo.name=noisy"] if algo == "noisy" else [f"algo={algo}"]
    if algo.startswith("space"):  # MAML with the optimizer space, drawn or in expectation
        sampling = "expectation" if algo.endswith("expectation") else "gumbel"
        name = ["algo=maml", "update=space", "algo.adam_lr=0.05"]
        name += [f"algo.space_sampling={sampling}", "algo.space_temperature=0.5"]
    if algo.startswith("mrmaml"):
        variant = "activations" if algo.endswith("activations") else "weights"
        # a visible posterior scale, so that the draws change the numbers
        name = ["algo=mrmaml", f"algo.variant={variant}", "algo.init_scale=-3"]
        name += [*ENCODED["CONV4" if workload is CONV4 else "SMOOTH"], "algo.bottleneck=3"]
        if workload is CONV4:
            workload = tuple(w for w in workload if not w.startswith("model"))
    if algo.startswith("metanas"):  # a small search network in place of the workload's model
        small = [*SEARCH, "model.ops=[conv_3x3,max_pool_3x3,skip_connect,zero]"]
        conv = workload is CONV4
        name = ["algo=metanas", *(small if conv else SEARCH_SMOOTH)]
        name += ["model.sampling=gumbel"] if algo.endswith("gumbel") else []
        workload = tuple(w for w in workload if not w.startswith("model"))
        if conv:  # 8x8 images: the search network costs many small operations
            workload = tuple(
                "task.image_size=8" if w.startswith("task.image_size") else w for w in workload
            )
    msl = ["algo.msl_iterations=100"] if algo == "mamlpp" else []
    msl += ["algo.lstm_hidden=2"] if algo == "metalstm" else []  # few weights to perturb
    return [*name, *inner, *msl, "device=cpu", "train.meta_batch_size=3", *workload, *overrides]


def distinct_rates(c: Components) -> None:
    """Learned rates all equal would hide a mix-up of tensors or steps."""
    rates = getattr(c.algorithm, "learned_rates", dict)()
    with torch.no_grad():
        for k, rate in enumerate(rates.values()):
            rate.mul_(1 + 0.3 * torch.sin(torch.arange(rate.numel()) + k).reshape(rate.shape))


def gradients(c: Components, batch: Any) -> tuple[Tensor, Tensor]:
    c.algorithm.zero_grad()
    out = c.algorithm.meta_loss(batch)
    out.loss.backward()
    values = torch.cat(
        [out.loss.reshape(1), out.metric, *(t.reshape(1) for t in out.terms.values())]
    )
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
        for p in c.algorithm.parameters()
    ]
    return torch.cat(grads), values


def state_of(c: Components) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in c.algorithm.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("algo", ALGOS)
def test_vmap_loop_and_threads_agree_on_conv4_with_batch_norm(float64, algo: str) -> None:
    results = {}
    for strategy in ("loop", "vmap", "threads"):
        c = build(compose_config(*config(algo, f"algo.batching={strategy}")))
        assert c.algorithm.batching == strategy
        assert c.model.norm_layers() or algo.startswith("mrmaml")
        distinct_rates(c)
        batch = sample(c)
        grads, values = gradients(c, batch)
        c.algorithm.eval()
        evaluation = c.algorithm.evaluate(batch)
        results[strategy] = (grads, values, evaluation.loss, evaluation.metric)
    reference = results["loop"]
    assert reference[0].norm() > 0
    # threads compute what the loop computes; vmap normalises with plain mean/variance
    # where the loop uses the fused kernel, so float64 rounding differs (up to 7e-10
    # relative, measured: the space rule's expectation); vmap's known batch-norm error
    # is 1e-2 relative, six orders of magnitude above this tolerance
    for strategy, tolerance in (("vmap", 1e-8), ("threads", 1e-10)):
        for ours, theirs in zip(results[strategy], reference, strict=True):
            scale = max(theirs.norm().item(), 1e-12)
            assert (ours - theirs).norm().item() / scale < tolerance, strategy


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_checkpoint_round_trip_and_seeds(tmp_path: Path, algo: str) -> None:
    """2N iterations equal N, a checkpoint written to disk and read back, and N more
    (parameters, buffers, optimizer state and every logged number); the first N of a
    second run with the same seed equal the first run's; another seed differs."""
    overrides = ("train.iterations=4", "train.val_every=2", "train.log_every=2", "val.num_tasks=3")
    cfg = compose_config(*config(algo, *overrides))
    straight, recorder = build(cfg), Recorder()
    meta_train(straight, recorder, LoopState())
    first = build(cfg)
    first.run.train.iterations = 2  # stop half way (the schedules still span 4)
    half = Recorder()
    meta_train(first, half, LoopState())
    path = tmp_path / "last.pt"
    save_checkpoint(path, half.checkpoints["last"])
    resumed = build(cfg)
    state = restore(resumed, load_checkpoint(path), str(path))
    assert state.iteration == 2
    assert_same_state(state_of(first), state_of(resumed))
    ours, theirs = resumed.optimizer.state_dict(), first.optimizer.state_dict()
    assert (
        ours["param_groups"] == theirs["param_groups"]
        and ours["state"].keys() == theirs["state"].keys()
    )
    for index, values in theirs["state"].items():
        assert all(torch.equal(v, ours["state"][index][k]) for k, v in values.items())
    rest = Recorder()
    meta_train(resumed, rest, state)
    assert_same_state(state_of(straight), state_of(resumed))

    def numbers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        drop = ("it_per_s", "wall_time")
        return [{k: v for k, v in r.items() if k not in drop} for r in records]

    assert numbers(half.records + rest.records) == numbers(recorder.records)
    assert numbers(half.records) == numbers(recorder.records[: len(half.records)])  # same seed
    other = build(compose_config(*config(algo, *overrides, "seed=1")))
    other.run.train.iterations = 2
    seeded = Recorder()
    meta_train(other, seeded, LoopState())
    assert numbers(seeded.records) != numbers(half.records)


@pytest.mark.parametrize("algo", ALGOS)
def test_meta_gradient_matches_central_finite_differences(float64, algo: str) -> None:
    c = build(compose_config(*config(algo, workload=SMOOTH)))
    distinct_rates(c)
    batch = sample(c)
    analytic, _ = gradients(c, batch)
    numeric, eps, index = torch.zeros_like(analytic), 1e-6, 0
    with torch.no_grad():
        for p in c.algorithm.parameters():
            flat = p.view(-1)
            for j in range(flat.numel()):
                original = flat[j].item()
                flat[j] = original + eps
                plus = c.algorithm.meta_loss(batch).loss.item()
                flat[j] = original - eps
                minus = c.algorithm.meta_loss(batch).loss.item()
                flat[j] = original
                numeric[index] = (plus - minus) / (2 * eps)
                index += 1
    error = ((analytic - numeric).norm() / numeric.norm()).item()
    if c.algorithm.exact_gradient:
        assert error < 1e-6
    else:  # first order: the dropped terms are far from zero, so the claim is checked too
        assert error > 1e-3


def test_noise_drawn_inside_tasks_depends_on_the_task_alone(float64) -> None:
    """Not vacuous: the noise changes the numbers, differs between tasks and iterations,
    and a task's draws do not depend on how many tasks share its meta-batch."""
    noisy = build(compose_config(*config("noisy")))
    plain = build(compose_config(*config("maml")))
    batch = sample(noisy)
    assert not torch.equal(gradients(noisy, batch)[0], gradients(plain, batch)[0])
    zero = build(compose_config(*config("noisy", "+algo.sigma=0.0")))
    assert torch.equal(gradients(zero, batch)[0], gradients(plain, batch)[0])
    metrics = noisy.algorithm.meta_loss(batch).metric
    torch.testing.assert_close(noisy.algorithm.meta_loss(batch[:2]).metric, metrics[:2])
    noisy.algorithm.outer_steps += 1  # the next iteration draws other noise for task 0
    later = sample(noisy)
    assert not torch.equal(later.keys, batch.keys)
