"""The small contract every algorithm meets, and the base of those with an inner loop.

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters (the model's
initialisation, plus whatever else it meta-learns: an update rule's rates, ...). The one
training loop calls ``meta_loss`` (backpropagated, then an outer optimizer step),
``evaluate`` (adapt on the support set, report the query set after each inner step)
and the hooks below; it never looks inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli import regularizers
from metacli.config import require
from metacli.engine.executor import STRATEGIES, TaskExecutor
from metacli.engine.inner import InnerLoop, Step
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.models.fused import backward_once
from metacli.params import Params
from metacli.registry import Registered, lookup
from metacli.regularizers import REGULARIZERS
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution
from metacli.updates.base import UpdateRule

# How a training meta-batch is computed: the executor's per-task strategies, or "stacked":
# every task one row of the same tensors with the meta-gradient written out
# (metacli/engine/stacked_meta_gradient.py), where the algorithm, model, loss and rule have it.
BATCHINGS = (*STRATEGIES, "stacked")

# Keys of a train line in metrics.jsonl that named terms must not shadow.
RESERVED = ("iteration", "split", "loss", "metric", "metric_name", "lr", "it_per_s", "wall_time")


@dataclass
class AlgoConfig:
    name: str = ""
    batching: str = "auto"
    # true: training runs through torch.compile (see TaskExecutor); compile time is logged
    # and recorded apart (summary.json: compile_s)
    compile: bool = False

    def __post_init__(self) -> None:
        require(
            self.batching in BATCHINGS,
            "algo.batching",
            self.batching,
            f"choose one of {', '.join(BATCHINGS)}",
        )


@dataclass
class MetaLoss:
    """What ``meta_loss`` returns: the scalar to backpropagate and what to log."""

    loss: Tensor  # scalar; its gradient is the meta-gradient
    metric: Tensor  # [B] each task's query metric
    terms: dict[str, Tensor] = field(default_factory=dict)  # named scalars, each logged


@dataclass
class Evaluation:
    """Query loss and metric of each task after 0..k inner steps."""

    loss: Tensor  # [B, k+1]
    metric: Tensor  # [B, k+1]
    predictions: Tensor | None = None  # [B, k+1, Q, ...] when asked for (figures)
    labels: list[str] | None = None  # what each task adapted with (a drawn architecture)


class MetaAlgorithm(nn.Module, Registered):
    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type[AlgoConfig]] = AlgoConfig
    uses_head: ClassVar[bool] = True  # False: the model is built without its linear head
    # False: training computes each task as one forward/backward over all its examples
    # (ProtoNet, pretraining); see TaskExecutor for what `auto` makes of it.
    inner_loop: ClassVar[bool] = True
    # True: a task's meta-gradient needs its autograd graph until its backward (MAML's
    # query loss); False: nothing is held between a task's steps (Reptile's theta - phi).
    # `auto` may overlap tasks in threads on a CPU only where nothing is held (see Conv4).
    keeps_graphs: ClassVar[bool] = True
    # True: a task draws from its random stream (``rng``); see TaskExecutor's contract.
    stochastic: ClassVar[bool] = False
    outer_steps: Tensor

    def __init__(self, cfg: AlgoConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.task = task
        per_task = "auto" if cfg.batching == "stacked" else cfg.batching  # (evaluation's)
        self.executor = TaskExecutor(
            per_task, model, self.inner_loop, cfg.compile, keeps_graphs=self.keeps_graphs
        )
        self.executor.stochastic = self.stochastic or model.stochastic
        # Outer steps taken; a buffer, so schedules inside algorithms survive a resume.
        self.register_buffer("outer_steps", torch.zeros((), dtype=torch.long))

    # --- before building ----------------------------------------------------------------
    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        """Adjust the model or outer-optimizer settings the algorithm needs, before building.

        Returns one line per change, for the log. What it decides is part of the
        effective config that summary.json and the checkpoints record.
        """
        return []

    @classmethod
    def model_input_shape(cls, cfg: AlgoConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The input shape the model is built for (the task's, unless the algorithm puts
        something before the model: MR-MAML's encoder)."""
        return input_shape

    # --- what the loop calls --------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        raise NotImplementedError

    def penalty(self) -> Tensor | None:
        """A weighted penalty on the meta-parameters added to the meta-loss (or None)."""
        return None

    def objective(self, batch: TaskBatch) -> MetaLoss:
        """What the outer optimizer minimises: ``meta_loss`` plus ``penalty``, each logged
        (``meta_loss``, ``regularizer``) when there is a penalty."""
        out = self.meta_loss(batch)
        penalty = self.penalty()
        if penalty is None:
            return out
        terms = {**out.terms, "meta_loss": out.loss.detach(), "regularizer": penalty.detach()}
        return MetaLoss(out.loss + penalty, out.metric, terms)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        """Adapt to each task's support set; measure the query set after every inner step."""
        raise NotImplementedError

    @property
    def exact_gradient(self) -> bool:
        """Whether the meta-gradient is the true gradient of the returned loss (second order,
        or no inner loop), so finite differences of ``meta_loss`` must match it."""
        return True

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The outer optimizer's parameter groups: ``model`` (the initialisation, which alone
        gets ``optim.weight_decay`` by default), then each submodule's ``param_group``."""
        groups: dict[str, list[nn.Parameter]] = {"model": list(self.model.parameters())}
        for name, child in self.named_children():
            if child is not self.model:
                group = getattr(child, "param_group", name)
                groups.setdefault(group, []).extend(child.parameters())
        return {name: params for name, params in groups.items() if params}

    def scalars(self) -> dict[str, float]:
        """Quantities worth logging with every train and validation line (learned rates)."""
        return {}

    def observe(self, batch: TaskBatch) -> None:
        """After each outer step: count it; let ``running`` batch norm see the inputs."""
        self.outer_steps += 1
        if self.model.tracks_running_stats:
            self.model.update_running_stats(batch.support_x)

    def on_validation(self, iteration: int, metric: float) -> dict[str, float]:
        """After each validation (pruning, annealing, discretising); returns named scalars
        for the validation line. State it changes must live in buffers (checkpointed)."""
        return {}

    def on_train_end(self, iteration: int) -> dict[str, float]:
        """Once training has reached ``train.iterations``, before the meta-test."""
        return {}

    def artifacts(self) -> dict[str, str | bytes]:
        """Files for the run folder (file name -> text or bytes), written at each validation
        and at the end of training."""
        return {}

    # --- helpers ----------------------------------------------------------------------------
    @property
    def batching(self) -> str:
        """How a training meta-batch is computed (``algo.batching``, ``auto`` resolved)."""
        if self.stacks():
            return "stacked"
        with torch.enable_grad():  # (training's choice, asked from anywhere)
            return self.executor.strategy

    def stacks(self) -> bool:
        """Whether training computes the meta-batch stacked, its meta-gradient written out
        (``algo.batching`` auto or stacked; see ``MAML.stacks``)."""
        return False

    def forward_with(self, params: Params, x: Tensor, step: int = 0, once: bool = False) -> Tensor:
        """The model with weights ``params`` on ``x``, as seen at inner step ``step``.
        ``once``: the caller backpropagates the result at most once, never with
        ``create_graph`` (a query loss), so layers may take their single-backward forms
        (``metacli.models.fused``)."""
        model = self.executor.module()
        model.set_step(step)
        buffers = self.model.named_tensors()[1]
        if buffers.keys() & params.keys():  # given with the weights (a task's draws): theirs
            buffers = {n: b for n, b in buffers.items() if n not in params}
        with backward_once(once):
            return model.functional(params, buffers, x)

    def mean_over_tasks(self, fn: Any, batch: TaskBatch, *shared: Any) -> MetaLoss:
        """``fn(rng, *shared, support_x, support_y, query_x, query_y) -> (loss, metric,
        terms)`` over the tasks, as a MetaLoss."""
        per_task_backward = not self.executor.functional and torch.is_grad_enabled()
        leaves: list[Tensor] = []
        if per_task_backward:
            leaves = [p for p in self.parameters() if p.requires_grad]
        loss, metric, terms = self.executor.mean(fn, batch.keys, shared, batch.tensors(), leaves)
        bad = [name for name in terms if name in RESERVED]
        if bad:
            raise ConfigError(f"{type(self).__name__} names a loss term {bad[0]!r}; rename it.")
        return MetaLoss(loss, metric, terms)


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
        for key in ("inner_batch", "test_inner_batch"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"algo.{key}", value, "it must be >= 1 or null")
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
        require(
            self.regularizer_weight >= 0,
            "algo.regularizer_weight",
            self.regularizer_weight,
            "it must be >= 0",
        )
        require(self.inner_lr > 0, "algo.inner_lr", self.inner_lr, "the learning rate must be > 0")
        require(self.inner_steps >= 1, "algo.inner_steps", self.inner_steps, "it must be >= 1")
        require(
            self.test_inner_steps is None or self.test_inner_steps >= 0,
            "algo.test_inner_steps",
            self.test_inner_steps,
            "it must be >= 0 or null",
        )
        require(
            self.test_inner_lr is None or self.test_inner_lr > 0,
            "algo.test_inner_lr",
            self.test_inner_lr,
            "the learning rate must be > 0 or null",
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
        """The parameters the inner loop updates: all but the batch-norm ones unless
        ``algo.adapt_norm`` (ANIL: the head)."""
        names = [n for n, _ in self.model.named_parameters()]
        if self.cfg.adapt_norm:
            return names
        norm = set(self.model.norm_names())
        return [n for n in names if n not in norm]

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
    ) -> Iterator[Step]:
        """The inner loop on one task's support set ``x`` [S, ...], ``y`` [S, ...] (on the
        task's own draws of a stochastic model: an architecture it samples), each step on
        ``batch`` of its examples (None: all), the rule started from ``state`` if given."""
        if self.model.stochastic:
            params = {**params, **self.model.draw(rng)}
        order = None
        if batch is not None and batch != x.shape[0]:
            order = minibatches(rng, x.shape[0], batch, steps)  # [steps, batch]

        def examples(step: int) -> tuple[Tensor, Tensor]:
            return (x, y) if order is None else (x[order[step]], y[order[step]])

        def loss(p: Params, step: int) -> Tensor:
            return self.support_loss(p, *examples(step), step, rng)

        def written(
            p: Params, step: int, names: list[str], want_loss: bool
        ) -> tuple[Tensor | None, Params] | None:
            return self.written_gradient(p, *examples(step), names, want_loss)

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
