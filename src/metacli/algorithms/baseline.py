"""Baseline (Chen et al. 2019, ICLR; wyharveychen/CloserLookFewShot's BaselineTrain and
BaselineFinetune), the base of Baseline++ and RFS.

Training is not episodic: mini-batches of ``algo.batch_size`` training images, each with
its class's global label (``TaskDistribution.sample_examples``, with the augmentation of
``algo.augment``), train the network and a linear classifier over all training classes
with cross-entropy. At validation and meta-test the network is frozen and a new
classifier is trained on each task's support embeddings: ``algo.finetune_epochs`` passes
in random order in mini-batches of ``algo.finetune_batch``, by SGD with the code's
momentum, dampening and weight decay, for every task of the batch at once (each task's
weights are one slice of a batched tensor; SGD acts on each element alone, so this is
the per-task optimiser exactly). docs/baseline.md lists the settings and the deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.algorithms.base import (
    AlgoConfig,
    Evaluation,
    MetaAlgorithm,
    MetaLoss,
    classification_task,
)
from metacli.config import require, require_at_least, require_steps
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.models.fused import backward_once
from metacli.streams import TaskRandom
from metacli.tasks.base import ClassificationTask, TaskBatch, TaskDistribution

# Images of one training mini-batch at most (a setting beyond it would exhaust memory).
MOST_IMAGES = 4096


@dataclass
class BaselineConfig(AlgoConfig):
    name: str = "baseline"
    batch_size: int = 16  # training images per step (train.py: 16)
    # crops, flips, colour jitter in training (--train_aug); off where task.augment is set
    augment: bool = True
    finetune_epochs: int = 100  # passes over a test task's support set
    finetune_batch: int = 4
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_dampening: float = 0.9
    finetune_weight_decay: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            1 <= self.batch_size <= MOST_IMAGES,
            "algo.batch_size",
            self.batch_size,
            f"1 to {MOST_IMAGES} images a step",
        )
        require_steps("algo.finetune_epochs", self.finetune_epochs, 0)
        require_at_least("algo.finetune_batch", self.finetune_batch, 1)
        require(self.finetune_lr > 0, "algo.finetune_lr", self.finetune_lr, "it must be > 0")
        for key in ("finetune_momentum", "finetune_dampening", "finetune_weight_decay"):
            require_at_least(f"algo.{key}", getattr(self, key), 0)


def cosine_scale(classes: int) -> float:
    """distLinear's fixed scale: 2 up to 200 classes, 10 beyond (Omniglot's 4112)."""
    return 2.0 if classes <= 200 else 10.0


class Classifier(nn.Module):
    """The training classifier over all training classes: linear with a zero bias
    (Baseline), or cosine similarity to weight-normalised class vectors times a fixed
    scale (Baseline++'s distLinear)."""

    param_group = "classifier"

    def __init__(self, dim: int, classes: int, cosine: bool) -> None:
        super().__init__()
        self.cosine = cosine
        self.weight = nn.Parameter(linear_init(1, classes, dim)[0][0])
        if cosine:  # weight norm: g * v / ||v||, g starting at ||v||
            self.norm = nn.Parameter(self.weight.detach().norm(dim=1, keepdim=True))
            self.scale = cosine_scale(classes)
        else:
            self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: Tensor) -> Tensor:
        if self.cosine:
            return cosine_scores(x[None], self.weight[None], self.norm[None], self.scale)[0]
        return x @ self.weight.T + self.bias


def linear_init(
    tasks: int, classes: int, dim: int, rng: list[TaskRandom] | None = None
) -> tuple[Tensor, Tensor]:
    """nn.Linear's initial weight [T, classes, dim] and bias [T, classes]: uniform on
    (-1/sqrt(dim), 1/sqrt(dim)), drawn from each task's stream (or torch's generator)."""
    bound = 1 / math.sqrt(dim)
    if rng is None:
        weight = (torch.rand(tasks, classes, dim) * 2 - 1) * bound
        bias = (torch.rand(tasks, classes) * 2 - 1) * bound
    else:
        weight = torch.stack([(r.uniform((classes, dim)) * 2 - 1) * bound for r in rng])
        bias = torch.stack([(r.uniform((classes,)) * 2 - 1) * bound for r in rng])
    return weight, bias


def cosine_scores(x: Tensor, direction: Tensor, norm: Tensor, scale: float) -> Tensor:
    """distLinear on a batch of tasks: x [T, N, D], class vectors v [T, C, D] with norms
    g [T, C, 1] -> scale * cos-like scores [T, N, C]."""
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    weight = norm * direction / direction.norm(dim=-1, keepdim=True)
    return scale * x @ weight.transpose(-1, -2)


class Baseline(MetaAlgorithm, key="baseline"):
    Config: ClassVar[type[AlgoConfig]] = BaselineConfig
    cfg: BaselineConfig
    inner_loop = False
    uses_head = False
    episodic = False
    stochastic = True  # a test task's classifier init and example order: its own stream
    cosine: ClassVar[bool] = False  # Baseline++: cosine classifiers

    def __init__(self, cfg: BaselineConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.classes = classification_task(task, cfg.name)
        dim = getattr(model, "feature_dim", None)
        if dim is None:
            raise ConfigError(
                f"algo={cfg.name} needs the width of model={model.cfg.name}'s features "
                f"(feature_dim), which it does not declare. Choose model=conv4 or resnet12."
            )
        self.feature_dim = int(dim)
        self.input_shape = tuple(task.input_shape)
        self.classifier = Classifier(self.feature_dim, self.classes.train_classes(), self.cosine)

    def training_batch(
        self, task: TaskDistribution, size: int, generator: torch.Generator
    ) -> TaskBatch:
        assert isinstance(task, ClassificationTask)
        own = self.cfg.augment and getattr(task.cfg, "augment", "none") == "none"
        return task.sample_examples(self.cfg.batch_size, generator, own)

    def training_logits(self, x: Tensor) -> Tensor:
        with backward_once():
            return self.classifier(self.model(x))

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        x, y = batch.support_x[0], batch.support_y[0]
        logits = self.training_logits(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean()
        return MetaLoss(loss, accuracy.detach()[None])

    # --- evaluation: a new classifier per task on frozen features ---------------------------
    def features(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Frozen support [B, S, D] and query [B, Q, D] features of every task."""

        def one(rng: TaskRandom, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return self.executor.module()(torch.cat([sx, qx]))

        with torch.no_grad():
            out = self.executor.map(one, batch.keys, (), batch.tensors())
        shots = batch.support_x.shape[1]
        return out[:, :shots].flatten(2), out[:, shots:].flatten(2)

    def task_scores(
        self, support: Tensor, support_y: Tensor, query: Tensor, ways: int, rng: list[TaskRandom]
    ) -> Tensor:
        """Query scores [T, Q, ways] of classifiers fine-tuned on each task's support."""
        cfg = self.cfg
        tasks, examples, dim = support.shape
        weight, bias = linear_init(tasks, ways, dim, rng)
        weight, bias = weight.to(support), bias.to(support)
        params = [weight.requires_grad_(), bias.requires_grad_()]
        if self.cosine:  # (distLinear has no bias: the second tensor is the norm g)
            params[1] = weight.detach().norm(dim=-1, keepdim=True).requires_grad_()

        def scores(x: Tensor) -> Tensor:
            if self.cosine:
                return cosine_scores(x, params[0], params[1], cosine_scale(ways))
            return x @ params[0].transpose(-1, -2) + params[1].unsqueeze(1)

        optimizer = torch.optim.SGD(
            params,
            lr=cfg.finetune_lr,
            momentum=cfg.finetune_momentum,
            dampening=cfg.finetune_dampening,
            weight_decay=cfg.finetune_weight_decay,
        )
        rows = torch.arange(tasks, device=support.device)[:, None]
        with torch.enable_grad():
            for _ in range(cfg.finetune_epochs):
                order = torch.stack([r.uniform((examples,)) for r in rng]).argsort(-1)
                for start in range(0, examples, cfg.finetune_batch):
                    pick = order[:, start : start + cfg.finetune_batch].to(support.device)
                    logits = scores(support[rows, pick])  # [T, b, ways]
                    # each task's mean loss, summed: each task's gradient is its own
                    loss = (
                        F.cross_entropy(
                            logits.flatten(0, 1), support_y[rows, pick].flatten(), reduction="none"
                        )
                        .view(pick.shape)
                        .mean(1)
                        .sum()
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            return scores(query)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        ways = self.classes.ways("test")
        support, query = self.features(batch)
        keys = self.executor.stream_keys(batch.keys, batch.tensors())  # (None: draws nothing)
        rng = [] if keys is None else [TaskRandom(key) for key in keys]
        scores = self.task_scores(support, batch.support_y, query, ways, rng).detach()
        loss = (
            F.cross_entropy(scores.flatten(0, 1), batch.query_y.flatten(), reduction="none")
            .view(batch.query_y.shape)
            .mean(1)
        )
        metric = (scores.argmax(-1) == batch.query_y).to(scores.dtype).mean(1)
        return Evaluation(
            loss.unsqueeze(1), metric.unsqueeze(1), scores.unsqueeze(1) if predictions else None
        )
