"""The small contract every algorithm meets (``algorithms/adaptive.py`` is the base of those
with an inner loop).

An algorithm is an ``nn.Module`` whose parameters are the meta-parameters (the model's
initialisation, plus whatever else it meta-learns: an update rule's rates, ...). The one
training loop calls ``meta_loss`` (backpropagated, then an outer optimizer step),
``evaluate`` (adapt on the support set, report the query set after each inner step)
and the hooks below; it never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli.config import require
from metacli.engine.executor import STRATEGIES, TaskExecutor
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.models.fused import backward_once
from metacli.params import Params
from metacli.registry import Registered
from metacli.tasks.base import ClassificationTask, TaskBatch, TaskDistribution

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


def classification_task(task: TaskDistribution, algo: str) -> ClassificationTask:
    """``task`` for an algorithm that only classifies, or the error that says so."""
    if not isinstance(task, ClassificationTask):
        raise ConfigError(
            f"algo={algo} classifies; task={task.cfg.name} is not a classification task. "
            f"Choose a classification task (task=omniglot, miniimagenet, image_folder, "
            f"synthetic)."
        )
    return task


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
    # False: training takes mini-batches of images with global labels (``training_batch``)
    # instead of episodes; validation and meta-test stay episodic.
    episodic: ClassVar[bool] = True
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
    def check_task(cls, cfg: AlgoConfig, task_cls: type) -> None:
        """Refuse (ConfigError) a new training run on a task distribution that this
        algorithm's settings do not fit; by default every task fits. Checked before the
        run starts (``metacli.precheck``), never for a resume or a meta-test of a run
        already made."""

    @classmethod
    def second_order(cls, cfg: AlgoConfig) -> bool:
        """Whether training keeps every inner step's graph for the meta-gradient (from the
        settings alone, for the memory estimate: ``metacli.resources``)."""
        return cls.keeps_graphs and cls.inner_loop and not getattr(cfg, "first_order", True)

    @classmethod
    def holds_query(cls, cfg: AlgoConfig) -> bool:
        """Whether training differentiates the query pass (MAML's query loss; Reptile
        and pretraining only log theirs)."""
        return cls.keeps_graphs

    @classmethod
    def head_bytes(
        cls, cfg: AlgoConfig, ways: int, support: int, queries: int, features: tuple[int, ...]
    ) -> int:
        """Bytes one task's head makes beyond the network's passes (the memory estimate,
        ``metacli.resources``): ``support`` and ``queries`` examples of ``ways`` classes,
        each embedded as ``features`` (the model's output, or its maps: ``map_shape``)."""
        return 0

    @classmethod
    def model_input_shape(cls, cfg: AlgoConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The input shape the model is built for (the task's, unless the algorithm puts
        something before the model: MR-MAML's encoder)."""
        return input_shape

    # --- what the loop calls --------------------------------------------------------------
    def training_batch(
        self, task: TaskDistribution, size: int, generator: torch.Generator
    ) -> TaskBatch:
        """The next training batch: ``size`` episodes (``train.meta_batch_size``)."""
        return task.sample(size, "train", generator)

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
