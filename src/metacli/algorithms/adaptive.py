"""The base of the algorithms that adapt the model to each task with an inner loop.

``Adaptive`` owns the update rule (``algo.update``) and drives the one inner loop
(``metacli.engine.inner``) for training and evaluation alike: fine-tune on the support set,
measure the query set after each step. MAML and its variants, Reptile and pretraining
subclass it; ``AdaptiveConfig`` holds the settings they share.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from metacli import regularizers
from metacli.algorithms.base import AlgoConfig, Evaluation, MetaAlgorithm
from metacli.config import require, require_at_least, require_steps
from metacli.engine.inner import InnerLoop, Step
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.params import Params
from metacli.registry import lookup
from metacli.regularizers import REGULARIZERS
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution
from metacli.updates.base import UpdateRule


def minibatches(rng: TaskRandom, examples: int, batch: int, steps: int) -> Tensor:
    """[steps, batch] example indices: passes over the examples, each in a fresh random
    order, cut into consecutive batches that may span two passes (as
    openai/supervised-reptile's ``_mini_batches``); static shapes, so it runs under vmap."""
    passes = -(-steps * batch // examples)
    order = rng.uniform((passes, examples)).argsort(dim=-1).flatten()
    return order[: steps * batch].reshape(steps, batch)


# The inner loop's support loss: the task's mean over the support examples; their sum
# (the mean times S); or the sum divided by the shots K, cbfinn/maml's xent (the mean times
# the ways N, so its alpha is N times metacli's mean step; the sum at 1 shot). Regression
# tasks have one "class": sum_over_shots is their mean (S = K), as MAML's mse.
INNER_LOSSES = ("mean", "sum", "sum_over_shots")

# Which parameters the inner loop updates (``algo.adapt``): every one; the linear head
# alone (ANIL); everything but the head (BOIL); or a list of name patterns (fnmatch's
# ``*`` and ``?``, e.g. ``[blocks.3.*, head.*]``) matched against the model's parameter
# names; a pattern that matches nothing stops the run with all of them listed.
ADAPT_MODES = ("all", "head", "body")


def select(names: list[str], adapt: Any, model: str) -> list[str]:
    """The names among ``names`` that ``algo.adapt`` selects (see ADAPT_MODES); a
    ConfigError where the selection is empty or the model has no head to split at."""
    head = [n for n in names if n.startswith("head.")]
    if adapt == "all":
        return names
    if adapt in ("head", "body"):
        if not head:
            raise ConfigError(
                f"algo.adapt={adapt} splits the model at its linear head, but {model} has "
                f"none (it is built without one for this algorithm). Use algo.adapt=all, "
                f"or a list of parameter-name patterns."
            )
        return head if adapt == "head" else [n for n in names if n not in head]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in adapt)]
    if not chosen:
        raise ConfigError(
            f"algo.adapt={list(adapt)} matches none of the parameters of {model}: "
            f"{', '.join(names)}. Give patterns of these names (* matches any text), "
            f"or algo.adapt=all | head | body."
        )
    return chosen


def squared_distance(params: Params, anchor: Params) -> Tensor:
    """||params - anchor||^2 over the tensors of ``anchor``."""
    return torch.stack([(params[n] - a).pow(2).sum() for n, a in anchor.items()]).sum()


@dataclass
class AdaptiveConfig(AlgoConfig):
    inner_lr: float = 0.01  # alpha, the inner loop's step size
    inner_steps: int = 1  # inner steps in meta-training
    # inner steps at validation and meta-test, the metric logged after each (0..k); null:
    # inner_steps. 10: MAML's sinusoid evaluation (Finn et al. 2017), which every
    # algorithm of the family inherits unless its paper evaluates otherwise
    test_inner_steps: int | None = 10
    test_inner_lr: float | None = None  # null = inner_lr
    # the inner-loop update rule: a built-in's name (metacli/updates/<name>.py), a plug-in's,
    # or a class's import path
    update: str = "sgd"
    regularizer: str = "none"  # none | l2 | path: Omega(initialisation), metacli/regularizers.py
    regularizer_weight: float = 0.0  # lambda in L_meta + lambda * Omega
    adapt: Any = "all"  # all | head | body | [name patterns]: see ADAPT_MODES
    adapt_norm: bool = True  # whether batch-norm parameters adapt in the inner loop
    inner_loss: str = "mean"  # the support loss the inner loop descends: see INNER_LOSSES
    # Examples per inner step in training / at evaluation (null: all of them), drawn as
    # openai/supervised-reptile draws them: passes over the examples in fresh random orders
    inner_batch: int | None = None
    test_inner_batch: int | None = None
    # false: each query is predicted in a batch of the support set and itself alone, so
    # batch-norm statistics never mix queries (Reptile's non-transductive evaluation)
    transductive: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.adapt, (list, tuple)):
            self.adapt = [str(pattern) for pattern in self.adapt]
            require(
                bool(self.adapt) and all(p.strip() for p in self.adapt),
                "algo.adapt",
                self.adapt,
                "give at least one parameter-name pattern, e.g. algo.adapt=[head.*]",
            )
        else:
            require(
                self.adapt in ADAPT_MODES,
                "algo.adapt",
                self.adapt,
                f"choose one of {', '.join(ADAPT_MODES)}, or a list of parameter-name "
                f"patterns, e.g. algo.adapt=[head.*]",
            )
        for key in ("inner_batch", "test_inner_batch"):
            require_at_least(f"algo.{key}", getattr(self, key), 1, null=True)
        require(
            self.inner_loss in INNER_LOSSES,
            "algo.inner_loss",
            self.inner_loss,
            f"choose one of {', '.join(INNER_LOSSES)}",
        )
        require(
            self.regularizer in REGULARIZERS,
            "algo.regularizer",
            self.regularizer,
            f"choose one of {', '.join(REGULARIZERS)}",
        )
        require_at_least("algo.regularizer_weight", self.regularizer_weight, 0)
        lr = "the learning rate"
        require_at_least("algo.inner_lr", self.inner_lr, 0, strict=True, what=lr)
        require_steps("algo.inner_steps", self.inner_steps, 1)
        require_steps("algo.test_inner_steps", self.test_inner_steps, 0, null=True)
        require_at_least(
            "algo.test_inner_lr", self.test_inner_lr, 0, strict=True, null=True, what=lr
        )


class Adaptive(MetaAlgorithm):
    """An algorithm that adapts the model to each task with an inner loop.

    The update rule (``algo.update``) and the inner-loop driver are shared by every
    such algorithm; evaluation (fine-tune on the support set, measure the query set after
    each step) is the same for all of them.
    """

    cfg: AdaptiveConfig
    # False: the meta-gradient never reaches an update rule's parameters (Reptile's
    # theta - phi, pretraining's joint loss), so only rules without parameters fit.
    trains_rule: ClassVar[bool] = True
    # The update rule that IS the method (the LSTM meta-learner, ALFA); None: any rule.
    fixed_update: ClassVar[str | None] = None
    # lambda of the proximal term the inner loop adds at validation and meta-test (iMAML)
    test_proximal: float = 0.0

    def __init__(self, cfg: AdaptiveConfig, model: Model, task: TaskDistribution) -> None:
        self.check_rule(cfg.name, cfg.update)
        super().__init__(cfg, model, task)
        self.train_steps, self.train_lr = cfg.inner_steps, cfg.inner_lr
        self.test_steps = cfg.inner_steps if cfg.test_inner_steps is None else cfg.test_inner_steps
        self.test_lr = cfg.inner_lr if cfg.test_inner_lr is None else cfg.test_inner_lr
        self.train_batch, self.test_batch = cfg.inner_batch, cfg.test_inner_batch
        adapted: Params = {n: p for n, p in model.named_parameters() if n in self.adapted_names()}
        rule: type[UpdateRule] = lookup("update", cfg.update, UpdateRule)
        self.rule = rule(cfg, adapted, cfg.inner_lr, cfg.inner_steps)
        self.executor.stochastic |= self.rule.stochastic
        # mini-batches are drawn from each task's stream
        self.executor.stochastic |= cfg.inner_batch is not None or cfg.test_inner_batch is not None
        if not self.trains_rule and any(True for _ in self.rule.parameters()):
            raise ConfigError(
                f"algo={cfg.name} cannot learn the parameters of algo.update={cfg.update}: "
                f"its meta-gradient never reaches them. Use algo.update=sgd (or another "
                f"rule without parameters), or an algorithm of the MAML family."
            )
        self.inner = InnerLoop(self.rule, self.adapted, lambda: self.executor.functional_grads)
        # Whether the support loss is the model on the inputs and the task's loss (not a
        # subclass's own: the LSTM meta-learner's, MetaNAS's forward), so that the model's
        # and the task's written backward passes may give its gradient (``written_gradient``)
        kind = type(self)
        self.plain_support_loss = (
            not model.stochastic
            and kind.support_loss is Adaptive.support_loss
            and kind.forward_with is MetaAlgorithm.forward_with
        )
        if cfg.regularizer == "path":
            model.squared_path_norm(self.initial_params())  # a clear error now, not later

    def penalty(self) -> Tensor | None:
        if self.cfg.regularizer == "none":
            return None
        omega = regularizers.penalty(self.cfg.regularizer, self.model, self.initial_params())
        return self.cfg.regularizer_weight * omega

    @classmethod
    def check_rule(cls, name: str, update: str) -> None:
        """An algorithm that is an update rule (``fixed_update``) takes no other."""
        if cls.fixed_update is not None and update != cls.fixed_update:
            raise ConfigError(
                f"algo={name} is the update rule {cls.fixed_update}, but "
                f"algo.update={update}. Remove that override, or use algo=maml "
                f"algo.update={update}."
            )

    def adapted_names(self) -> list[str]:
        """The parameters the inner loop updates: those ``algo.adapt`` selects, less the
        batch-norm ones unless ``algo.adapt_norm``."""
        names = [n for n, _ in self.model.named_parameters()]
        chosen = select(names, self.cfg.adapt, f"model={self.model.cfg.name}")
        if self.cfg.adapt_norm:
            return chosen
        norm = set(self.model.norm_names())
        return [n for n in chosen if n not in norm]

    def adapted(self, params: Params) -> Params:
        names = self.__dict__.get("_adapted")
        if names is None:  # the structure is fixed once built
            names = self.__dict__["_adapted"] = set(self.adapted_names())
        return {n: p for n, p in params.items() if n in names}

    def initial_params(self) -> Params:
        """The meta-learned initialisation the inner loop starts from."""
        return self.model.named_tensors()[0]

    def inner_scale(self, examples: int, classes: int) -> int:
        """What ``algo.inner_loss`` multiplies the task's mean support loss by, for a
        support set of ``examples`` over ``classes`` classes."""
        if self.cfg.inner_loss == "sum":
            return examples
        if self.cfg.inner_loss == "sum_over_shots" and self.task.is_classification:
            return classes  # S / K = N
        return 1

    def scaled(self, value: Tensor, prediction: Tensor, y: Tensor) -> Tensor:
        """The task's mean support loss (or its gradient) as ``algo.inner_loss`` asks."""
        scale = self.inner_scale(y.shape[0], prediction.shape[-1])
        return value if scale == 1 else value * scale

    def support_loss(
        self, params: Params, x: Tensor, y: Tensor, step: int, rng: TaskRandom
    ) -> Tensor:
        prediction = self.forward_with(params, x, step)  # [S, classes] or [S, ...]
        return self.scaled(self.task.loss(prediction, y), prediction, y)  # mean over S

    def written_gradient(
        self, params: Params, x: Tensor, y: Tensor, names: list[str], want_loss: bool
    ) -> tuple[Tensor | None, Params] | None:
        """``support_loss`` and its gradient for ``names``, from the model's and the task's
        backward passes written out (``Model.functional_backward``, ``loss_gradient``);
        None where either is not."""
        written = self.executor.module().functional_backward(params, x)
        if written is None:
            return None
        prediction, backward = written
        d_prediction = self.task.loss_gradient(prediction, y)
        if d_prediction is None:
            return None
        loss = self.scaled(self.task.loss(prediction, y), prediction, y) if want_loss else None
        return loss, backward(self.scaled(d_prediction, prediction, y), names)

    def adapt(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        lr: float,
        first_order: bool,
        rng: TaskRandom,
        keep_loss: bool = False,
        batch: int | None = None,
        state: Any = None,
        proximal: float = 0.0,
    ) -> Iterator[Step]:
        """The inner loop on one task's support set ``x`` [S, ...], ``y`` [S, ...] (on the
        task's own draws of a stochastic model: an architecture it samples), each step on
        ``batch`` of its examples (None: all), the rule started from ``state`` if given.
        ``proximal``: lambda of a term (lambda / 2) ||phi - phi_0||^2 added to the support
        loss, phi_0 the adapted parameters where the loop starts (iMAML's inner problem)."""
        if self.model.stochastic:
            params = {**params, **self.model.draw(rng)}
        anchor = {n: p.detach() for n, p in self.adapted(params).items()} if proximal else {}
        order = None
        if batch is not None and batch != x.shape[0]:
            order = minibatches(rng, x.shape[0], batch, steps)  # [steps, batch]

        def examples(step: int) -> tuple[Tensor, Tensor]:
            return (x, y) if order is None else (x[order[step]], y[order[step]])

        def loss(p: Params, step: int) -> Tensor:
            value = self.support_loss(p, *examples(step), step, rng)
            if not anchor:
                return value
            return value + 0.5 * proximal * squared_distance(p, anchor)

        def written(
            p: Params, step: int, names: list[str], want_loss: bool
        ) -> tuple[Tensor | None, Params] | None:
            found = self.written_gradient(p, *examples(step), names, want_loss)
            if found is None or not anchor:
                return found
            value, grads = found
            if value is not None:
                value = value + 0.5 * proximal * squared_distance(p, anchor)
            return value, {n: g + proximal * (p[n] - anchor[n]) for n, g in grads.items()}

        by_hand = written if self.plain_support_loss else None
        return self.inner.run(
            params, loss, steps, lr, first_order, rng, keep_loss, state, written=by_hand
        )

    def start_state(self, lr: float) -> Any:
        """The update rule's state a task starts from (None: a fresh one, ``rule.init``)."""
        return None

    def query_step(self, index: int) -> int:
        """The inner step whose batch-norm set the query sees after ``index`` updates."""
        return index

    def trace(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Query loss, metric [k+1] and predictions [k+1, Q, ...] after 0..k inner steps."""
        state = self.start_state(self.test_lr)
        steps = self.adapt(
            params,
            sx,
            sy,
            self.test_steps,
            self.test_lr,
            True,
            rng,
            batch=self.test_batch,
            state=state,
            proximal=self.test_proximal,
        )
        return self.measure(steps, qx, qy, sx)

    def predict(self, params: Params, qx: Tensor, step: int, sx: Tensor | None) -> Tensor:
        """The query predictions [Q, ...]: in one batch (transductive batch norm), or each
        query in a batch of the support set ``sx`` and itself (``algo.transductive=false``,
        openai/supervised-reptile's evaluation), its statistics never mixing queries."""
        if self.cfg.transductive or sx is None or not self.model.norm_layers():
            return self.forward_with(params, qx, step, once=True)  # (under no_grad)

        def alone(query: Tensor) -> Tensor:  # [...] -> the query's row
            return self.forward_with(params, torch.cat([sx, query[None]]), step)[-1]

        # one forward of Q batches [S + 1, ...]: with unbatched weights the convolutions
        # fold the queries into their batch, and the norm's statistics stay per query
        return torch.func.vmap(alone, randomness="same")(qx)

    def measure(
        self, steps: Iterator[Step], qx: Tensor, qy: Tensor, sx: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The query set's loss, metric [k+1] and predictions [k+1, Q, ...] at each step."""
        losses, metrics, predictions = [], [], []
        for step in steps:
            prediction = self.predict(step.params, qx, self.query_step(step.index), sx)
            losses.append(self.task.loss(prediction, qy))
            metrics.append(self.task.metric(prediction, qy))
            predictions.append(prediction)
        return torch.stack(losses), torch.stack(metrics), torch.stack(predictions)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        params = {name: p.detach() for name, p in self.initial_params().items()}
        with torch.no_grad():
            loss, metric, outputs = self.executor.map(
                self.trace, batch.keys, (params,), batch.tensors()
            )
        return Evaluation(loss, metric, outputs if predictions else None)  # [B, k+1] ...

    def scalars(self) -> dict[str, float]:
        return self.rule.scalars() or {"inner_lr": self.train_lr}

    def learned_rates(self) -> dict[str, Tensor]:
        return self.rule.rates()
