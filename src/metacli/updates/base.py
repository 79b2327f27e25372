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
declared by its ``Config`` dataclass; ``conf/update/<name>.yaml`` holds their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from metacli.engine.random import TaskRandom
from metacli.registry import Registered

Params = dict[str, Tensor]


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
    needs_loss: ClassVar[bool] = False  # True: `update` gets the support loss, else None
    stochastic: ClassVar[bool] = False  # True: `init`/`update` draw from the task's rng

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        """``cfg``: the algorithm's config (with this rule's keys); ``params``: the adapted
        meta-parameters (their names and shapes); ``lr``: algo.inner_lr; ``steps``: the
        training inner steps."""
        super().__init__()
        self.cfg = cfg

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        """The rule's state for one task before its first step (default: the step size)."""
        return lr

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        raise NotImplementedError

    def terms(self, state: Any) -> dict[str, Tensor]:
        """Per-task quantities of a task's final state worth logging (a learned optimizer's
        gates, generated rates): scalars, averaged over the meta-batch into metrics.jsonl."""
        return {}

    def rates(self) -> dict[str, Tensor]:
        """Learned inner rates by the name of the parameter they scale (if any)."""
        return {}

    def scalars(self) -> dict[str, float]:
        """What is worth logging about the rule (metrics.jsonl, TensorBoard, MLflow)."""
        return {}
