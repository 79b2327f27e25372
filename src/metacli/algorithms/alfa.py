"""ALFA (Baik et al. 2020, "Meta-learning with adaptive hyperparameters"): MAML whose inner
loop takes its learning rate and weight decay, per task and step, from a generator network
(the update rule ``alfa``, metacli/updates/alfa.py).

``algo.init=learned`` is ALFA on MAML's meta-learned initialisation; ``algo.init=random``
keeps the network's random initialisation (never updated: it is left out of the outer
optimizer) and meta-learns only the inner loop, the paper's surprising result. Batch-norm
parameters stay out of the inner loop (``algo.adapt_norm=false``), as in the authors' code
(``enable_inner_loop_optimizable_bn_params: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.config import require
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.tasks.base import TaskDistribution


@dataclass
class ALFAConfig(MAMLConfig):
    name: str = "alfa"
    update: str = "alfa"
    inner_steps: int = 5  # the authors' number_of_training_steps_per_iter
    test_inner_steps: int | None = None  # null: inner_steps, as the authors' evaluation
    init: str = "learned"  # learned (MAML + ALFA) | random (ALFA from a random initialisation)
    adapt_norm: bool = False  # the authors' code keeps batch norm out of the inner loop
    on_regression: bool = False  # true: run on a regression task, which check_task refuses

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.init in ("learned", "random"), "algo.init", self.init, "learned or random")


class ALFA(MAML, key="alfa"):
    Config: ClassVar[type[AlgoConfig]] = ALFAConfig
    cfg: ALFAConfig
    fixed_update = "alfa"

    @classmethod
    def check_task(cls, cfg: AlgoConfig, task_cls: type) -> None:
        assert isinstance(cfg, ALFAConfig)
        if not getattr(task_cls, "is_classification", True) and not cfg.on_regression:
            task = getattr(task_cls, "key", task_cls.__name__)
            raise ConfigError(
                f"algo=alfa generates its inner learning rates and weight decays per task "
                f"and step, and on a regression task (task={task}) they overshoot: on the "
                f"sinusoid seed 2 reached an infinite meta-loss at iteration 162 and seed 0 "
                f"barely adapted (docs/defaults.md). ALFA is the authors' recipe for "
                f"few-shot classification. On a regression task choose algo=maml or "
                f"algo=metasgd, or set algo.on_regression=true to run ALFA anyway."
            )

    def __init__(self, cfg: ALFAConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        if cfg.init == "random":  # no meta-gradient is computed for it, none applied
            model.requires_grad_(False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        if self.cfg.init == "random":  # the random initialisation is never updated
            groups.pop("model", None)
        return groups
