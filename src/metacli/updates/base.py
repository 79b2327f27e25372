"""What every inner-loop update rule provides: ``init`` and ``update``, with explicit state.

An update rule turns one task's parameters and their support-loss gradients into new
parameters, once per inner step (the hand-written ``theta - alpha * grad`` of MAML is
the rule ``sgd``). It is an ``nn.Module`` owned by the algorithm, so its own parameters
(learned rates, an LSTM's weights) are meta-parameters, trained by the outer optimizer in
their own parameter group (``update``: no weight decay unless asked).

Per task, the inner-loop driver (``metacli.engine.inner``) calls

    state = rule.init(params, lr, rng)
    params, state = rule.update(params, grads, loss, state, step)   # step = 0, 1, ...

with ``params`` and ``grads`` dicts of the adapted tensors, ``loss`` the support loss
(a scalar; None unless the rule sets ``needs_loss``, since it costs time), ``lr`` the
phase's step size (``algo.inner_lr`` in training, ``algo.test_inner_lr`` at
evaluation) and ``rng`` the task's random stream (draws need ``stochastic = True``). Both run
inside the per-task executor, so they act on ONE task and must be written with tensor
operations only (they run under ``vmap`` too). A rule's settings are keys of ``algo``
declared by its ``Config`` dataclass, which holds their defaults (``update=<name>`` adds
them to ``algo``; ``metacli.options``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli.errors import ConfigError
from metacli.params import Params
from metacli.registry import Registered
from metacli.streams import TaskRandom


@dataclass
class UpdateConfig:
    """Settings of a rule, added to the algorithm's ``algo`` section (none by default)."""


def slot(name: str) -> str:
    """Parameter names contain dots, which module attribute names may not."""
    return name.replace(".", "__")


class UpdateRule(nn.Module, Registered):
    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type] = UpdateConfig
    param_group: ClassVar[str] = "update"  # the outer optimizer's group of its parameters
    # Per rule, but a rule made of others (``space``) sets them per instance.
    needs_loss: bool = False  # True: `update` gets the support loss, else None
    stochastic: bool = False  # True: `init`/`update` draw from the task's rng
    # False: what flows back through the rule is an estimate, not the derivative
    # (straight-through draws, inputs read detached), so finite differences will differ.
    exact: bool = True

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        """``cfg``: the algorithm's config (with this rule's keys); ``params``: the adapted
        meta-parameters (their names and shapes); ``lr``: algo.inner_lr; ``steps``: the
        training inner steps."""
        super().__init__()
        self.cfg = cfg
        self.names = list(params)
        # A learned step size per adapted tensor, once ``learn_hyperparameters`` made one.
        self.learned_lr: nn.ParameterDict | None = None

    @classmethod
    def schema(cls, node: Any) -> type:
        """The settings this rule adds to ``algo`` for the config ``node`` (its ``Config``;
        a rule made of others adds theirs)."""
        return cls.Config

    def learn_hyperparameters(self, lr: float) -> None:
        """Make the rule's hand-set hyperparameters meta-parameters, starting from their
        settings (the optimizer space does this for its members). Nothing by default: a
        rule's hyperparameters are learned already (Meta-SGD, ALFA) or it has none."""

    def learn_step_sizes(self, lr: float) -> None:
        """A learned step size per adapted tensor, starting at ``lr`` (see ``step_size``)."""
        self.learned_lr = nn.ParameterDict(
            {slot(n): nn.Parameter(torch.tensor(float(lr))) for n in self.names}
        )

    def step_size(self, name: str, lr: Any) -> Any:
        """The step size of tensor ``name``: its learned one, else the phase's ``lr``."""
        return lr if self.learned_lr is None else self.learned_lr[slot(name)]

    def step_sizes(self, lr: float) -> dict[str, float | Tensor] | None:
        """Where the rule is theta <- theta - alpha * grad (no state, no draws): each
        adapted tensor's alpha for the phase's ``lr``, a number or a tensor that broadcasts
        to it. Such rules may have their meta-gradient written out
        (``metacli.engine.stacked_meta_gradient``); None for any other rule."""
        return None

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        """The rule's state for one task before its first step (default: the step size)."""
        return lr

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        raise NotImplementedError

    def export_state(self, state: Any) -> dict[str, Tensor]:
        """A task's final state as named tensors, to carry over to the next task
        (``algo.carry_state``: Reptile's reference code keeps one TF Adam across tasks)."""
        raise ConfigError(
            f"algo.update={self.cfg.update} keeps no state that can carry over from task to "
            f"task. Use algo.update=adam, or set algo.carry_state=false."
        )

    def import_state(self, tensors: dict[str, Tensor], lr: float) -> Any:
        """The state ``export_state`` made, to start a task from (lr: the phase's)."""
        raise NotImplementedError

    def terms(self, state: Any) -> dict[str, Tensor]:
        """Per-task quantities of a task's final state worth logging (a learned optimizer's
        gates, generated rates): scalars, averaged over the meta-batch into metrics.jsonl."""
        return {}

    def rates(self) -> dict[str, Tensor]:
        """Learned inner rates by the name of the parameter they scale (if any)."""
        if self.learned_lr is None:
            return {}
        return {n: self.learned_lr[slot(n)] for n in self.names}

    def scalars(self) -> dict[str, float]:
        """What is worth logging about the rule (metrics.jsonl, TensorBoard, MLflow)."""
        if self.learned_lr is None:
            return {}
        rates = torch.stack([r.detach() for r in self.learned_lr.values()])
        return {"inner_lr_mean": rates.mean().item()}
