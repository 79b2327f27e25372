"""The contract of metacli.contract, held by every registered component; a new one is
covered by registering it.

Algorithms (and ``noisy``, a test algorithm that draws noise inside every task; MAML with
the optimizer space, drawn per task or in expectation; MetaNAS with architectures drawn
per task): the batching strategies agree in float64 on a Conv-4 with batch norm (MetaNAS:
a small search network), 2N iterations equal N, a checkpoint and N more, seeds decide
the numbers, and the meta-gradient matches finite differences where it is exact (differs
where it is first order). Update rules, models and tasks: every check ``metacli check``
runs on them, each option on a small workload.
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
from metacli.build import build
from metacli.contract import (
    CONV4,
    SMOOTH,
    Contract,
    Result,
    gradients,
    run_checks,
)
from metacli.loop import sample
from metacli.options import option_node
from metacli.params import Params
from metacli.registry import builtins
from metacli.streams import TaskRandom
from tests.conftest import OMNIGLOT, compose_config
from tests.test_image_folder import make as image_folder


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
    *builtins("algo"),
    *("noisy", "mrmaml-activations", "space", "space-expectation", "metanas-gumbel"),
    "adapt-patterns",  # MAML adapting a list of parameter-name patterns (algo.adapt)
    "rfs-distill",  # RFS with a born-again generation (a boundary inside the short runs)
]
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


# Algorithms without an inner loop: a head on the embeddings, or non-episodic training.
HEADS = ("protonet", "r2d2", "metaoptnet", "matchingnet", "relationnet")
NON_EPISODIC = ("baseline", "baselinepp", "rfs")
# Relation Networks compare feature maps: a Conv-4 that keeps them (tiny maps, and no batch
# norm or pooling in the network for the finite differences).
MAPS = {
    "CONV4": ("model=conv4", "model.filters=3", "model.pool_blocks=2"),
    "SMOOTH": ("model=conv4", "model.filters=2", "model.pool_blocks=0", "model.norm=none"),
}


def config(algo: str, *overrides_given: str, workload: tuple[str, ...] = CONV4) -> list[str]:
    overrides = overrides_given
    if algo == "rfs-distill":
        algo, overrides = "rfs", ("algo.distill_generations=1", *overrides)
    headless = algo in HEADS or algo in NON_EPISODIC
    inner = [] if headless else ["algo.inner_steps=2", "algo.inner_lr=0.1"]
    inner += [] if headless else ["algo.test_inner_steps=2"]
    if algo == "relationnet":
        maps = MAPS["CONV4" if workload is CONV4 else "SMOOTH"]
        workload = (*(w for w in workload if not w.startswith("model")), *maps)
    if algo == "metaoptnet":  # the QP solved to convergence: its answer exact to rounding,
        # on more features than support examples (a singular kernel is ill-conditioned)
        inner += ["algo.qp_iterations=50", "algo.test_qp_iterations=50"]
        overrides = ("model.filters=8",) if workload is CONV4 else ("model.hidden=[8]",)
        overrides = (*overrides, *overrides_given)
    if algo in NON_EPISODIC:  # small training batches, short fine-tuning
        inner += ["algo.batch_size=6", "algo.finetune_epochs=2"]
    name = ["algo=maml", "algo.name=noisy"] if algo == "noisy" else [f"algo={algo}"]
    if algo == "adapt-patterns":  # the last block's convolution and the head's bias
        name = ["algo=maml", "algo.adapt=[blocks.3.conv.*,head.bias]"]
        if workload is not CONV4:
            name = ["algo=maml", "algo.adapt=[body.1.weight,head.bias]"]
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


def contract_of(algo: str) -> Contract:
    return Contract(config(algo), config(algo, workload=SMOOTH))


def assert_held(result: Result) -> None:
    assert result.held, f"{result.name}: {result.detail}"


@pytest.mark.parametrize("algo", ALGOS)
def test_vmap_loop_and_threads_agree_on_conv4_with_batch_norm(algo: str) -> None:
    assert_held(contract_of(algo).strategies())


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_checkpoint_round_trip_and_seeds(algo: str) -> None:
    """2N iterations equal N, a checkpoint written to disk and read back, and N more
    (parameters, buffers, optimizer state and every logged number); the same seed gives
    the same numbers, another seed others."""
    contract = contract_of(algo)
    assert_held(contract.resume())
    assert_held(contract.seeds())


@pytest.mark.parametrize("algo", ALGOS)
def test_meta_gradient_matches_central_finite_differences(algo: str) -> None:
    """Along 8 random unit directions in float64; a first-order meta-gradient must differ."""
    result = contract_of(algo).gradient(directions=8)
    assert_held(result)
    assert ("first order" in result.detail) != contract_of(algo).build().algorithm.exact_gradient


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


# --- update rules, models and tasks: what `metacli check` runs ---------------------------
# A rule that is an algorithm's default (sgd is MAML's) is held to the contract with that
# algorithm above; the others with MAML here.
OWN_RULES = {str(option_node("algo", a).get("update")) for a in builtins("algo")}
SMALL = {  # each option on a workload a unit test affords
    ("model", "conv4"): ("model.filters=4",),
    ("model", "resnet12"): ("model.widths=[2,2,2,2]",),
    ("model", "darts"): (
        "model.channels=2",
        "model.cells=2",
        "model.nodes=2",
        "model.reductions=[1]",
        "model.stem_multiplier=1",
        "model.ops=[conv_3x3,max_pool_3x3,skip_connect,zero]",
        "task.image_size=8",
    ),
    ("model", "genotype"): (
        f"model.genotype={Path(__file__).parent / 'data' / 'genotype.json'}",
        "task.image_size=8",
    ),
    ("task", "omniglot"): (f"data.root={OMNIGLOT}", "task.ways=3", "task.queries=2"),
    ("task", "miniimagenet"): ("task.ways=2", "task.queries=2", "task.image_size=16"),
    ("task", "image_folder"): ("task.ways=2", "task.queries=2", "task.image_size=8"),
    # the new releases, written in their layouts by tests/release_fixtures.py
    # with augmentation: resume and the strategies must hold with it on
    ("task", "cifarfs"): (
        "task.ways=2",
        "task.queries=2",
        "task.image_size=8",
        "task.augment=standard",
    ),
    ("task", "tieredimagenet"): ("task.ways=2", "task.queries=2", "task.image_size=8"),
    ("task", "cub"): ("task.ways=2", "task.queries=2", "task.image_size=8"),
}
CHECKED = [
    *(("update", r) for r in builtins("update") if r not in OWN_RULES),
    *(("model", m) for m in builtins("model")),
    # fc100 is cifarfs's code (tasks/cifar100.py) with other class lists: checked once
    *(("task", t) for t in builtins("task") if t != "fc100"),
]


@pytest.mark.parametrize(("group", "option"), CHECKED)
def test_update_rules_models_and_tasks_meet_the_contract(
    tmp_path: Path, group: str, option: str
) -> None:
    given = list(SMALL.get((group, option), ()))
    if option == "omniglot" and not (OMNIGLOT / "images_background.zip").is_file():
        pytest.skip("real Omniglot is not here (tests/test_omniglot.py uses fixtures)")
    if option == "miniimagenet":
        from tests.test_miniimagenet import make as miniimagenet

        given.append(f"data.root={miniimagenet(tmp_path / 'mini', 'folders')}")
    if option == "image_folder":
        root = image_folder(tmp_path / "folder", classes=12)
        given += [f"data.root={root}", "task.ratios=[0.5,0.25,0.25]"]
    if option in ("cifarfs", "tieredimagenet", "cub"):
        from tests import release_fixtures as releases

        write = {
            "cifarfs": lambda p: releases.cifar100_release(p, per_class=4),
            "tieredimagenet": lambda p: releases.tiered_release(p, "npz", per_class=4),
            "cub": lambda p: releases.cub_release(p, classes=8, per_class=4),
        }[option]
        write(tmp_path / option)
        given += [f"data.root={tmp_path / option}", f"data.cache_dir={tmp_path / 'cache'}"]
    results = run_checks(group, option, given)
    assert {r.name for r in results} >= {"builds", "strategies", "resume", "gradient"}
    failed = [f"{r.name}: {r.detail}" for r in results if r.held is False]
    assert not failed, failed


def test_the_contract_catches_a_wrong_meta_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: a meta-gradient scaled by 1.01 fails the finite differences."""
    contract = contract_of("maml")
    original = MAML.meta_loss

    def scaled(self: MAML, batch: Any) -> Any:
        out = original(self, batch)
        if torch.is_grad_enabled():
            loss = out.loss
            out.loss = loss + 0.01 * (loss - loss.detach())
        return out

    monkeypatch.setattr(MAML, "meta_loss", scaled)
    result = contract.gradient()
    assert result.held is False and "from finite differences" in result.detail
