"""What every task distribution provides: batched episodes, a loss and a metric."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metacli.config import require, require_at_least
from metacli.errors import ConfigError
from metacli.registry import Registered

SPLITS = ("train", "val", "test")  # the task splits of every distribution
# task.augment: the training images' augmentation (metacli.tasks.images.augment says each)
AUGMENTATIONS = ("none", "standard", "crop_flip", "resized_crop")


@dataclass
class TaskConfig:
    name: str = ""
    shots: int = 1
    queries: int = 1
    test_shots: int | None = None
    test_queries: int | None = None  # queries at validation/meta-test (null: queries)

    def __post_init__(self) -> None:
        require_at_least("task.shots", self.shots, 1)
        require_at_least("task.queries", self.queries, 1)
        require_at_least("task.test_queries", self.test_queries, 1, null=True)
        require_at_least("task.test_shots", self.test_shots, 1, null=True)


@dataclass
class TaskBatch:
    """A meta-batch of episodes; axis 0 is the task.

    ``keys`` name each task's random stream (``metacli.streams``): the loop sets
    them from the seed, the split, the iteration and the task's index; a batch without
    keys gets fixed ones from the executor.
    """

    support_x: Tensor  # [B, S, *input_shape]
    support_y: Tensor  # [B, S, *target_shape]
    query_x: Tensor  # [B, Q, *input_shape]
    query_y: Tensor  # [B, Q, *target_shape]
    keys: Tensor | None = None  # [B] int64

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: slice) -> TaskBatch:
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            None if self.keys is None else self.keys[index],
        )

    def with_keys(self, keys: Tensor) -> TaskBatch:
        sx, sy, qx, qy = self.tensors()
        return TaskBatch(sx, sy, qx, qy, keys.to(sx.device))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    @staticmethod
    def joined(support: Tensor, query: Tensor) -> Tensor:
        """One task's support and query examples as one set (Reptile, pretraining)."""
        return torch.cat([support, query])

    def to(self, device: torch.device) -> TaskBatch:
        sx, sy, qx, qy = (t.to(device) for t in self.tensors())
        return TaskBatch(sx, sy, qx, qy, None if self.keys is None else self.keys.to(device))


class TaskDistribution(Registered):
    """A distribution over tasks. ``loss`` and ``metric`` act on ONE task (they run under vmap)."""

    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    input_shape: tuple[int, ...]
    output_dim: int
    metric_name: str
    higher_is_better: bool
    is_classification: ClassVar[bool] = False  # labels 0..N-1 and a cross-entropy loss
    # ``loss`` and ``metric`` written out over a stack of tasks (None: not written out)
    stacked_loss: ClassVar[StackedLoss | None] = None
    # images a dataset decodes into its uint8 cache (metacli.resources; None: not known)
    stored_images: ClassVar[int | None] = None
    augments: ClassVar[bool] = False  # whether task.augment may name an augmentation

    def __init__(
        self, cfg: TaskConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        self.cfg = cfg
        self.data_root = data_root
        augment = getattr(cfg, "augment", "none")
        if augment != "none" and not self.augments:
            raise ConfigError(
                f"task.augment={augment}, but task={cfg.name} has no images to augment. "
                f"Set task.augment=none."
            )
        shape = self.shape_of(cfg)
        if shape is not None:
            self.input_shape = shape

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...] | None:
        """An example's input shape from the settings alone, before any data is read (the
        memory estimate, ``metacli.resources``); None: known only from the data."""
        shape = getattr(cls, "input_shape", None)
        return tuple(shape) if shape is not None else None

    @classmethod
    def outputs_of(cls, cfg: TaskConfig) -> int:
        """The width of the model's head from the settings alone."""
        return int(getattr(cls, "output_dim", 1))

    def shots(self, split: str) -> int:
        """Support size: meta-test (and validation, which mirrors it) may use other shots."""
        if split != "train" and self.cfg.test_shots is not None:
            return self.cfg.test_shots
        return self.cfg.shots

    def queries(self, split: str) -> int:
        """Query size: ProtoNets train with 5 queries per class and test with 15."""
        if split != "train" and self.cfg.test_queries is not None:
            return self.cfg.test_queries
        return self.cfg.queries

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` episodes of ``split`` (train | val | test) drawn from ``generator``."""
        raise NotImplementedError

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def augment_batch(self, batch: TaskBatch, keys: Tensor) -> TaskBatch:
        """A training batch with ``task.augment`` applied, task i drawing from the random
        stream of ``keys[i]`` (so its images change alike whatever the batching)."""
        return batch

    def loss_gradient(self, prediction: Tensor, target: Tensor) -> Tensor | None:
        """d loss / d prediction of ONE task, written out (``stacked_loss`` on a stack of
        that one task), for a model whose backward pass is written out too
        (``Model.functional_backward``); None: autograd computes the gradient."""
        form = self.stacked_loss
        if form is None or not form.fits(prediction[None], target[None]):
            return None
        return form.gradient(prediction[None], target[None])[0]


class StackedLoss:
    """A task's loss written out over a stack of tasks (a leading task dimension T), for
    the meta-gradient computed by hand (``metacli.engine.stacked_meta_gradient``): each
    task's loss and metric, and the first and second derivatives of each task's loss in
    its predictions."""

    def fits(self, prediction: Tensor, target: Tensor) -> bool:
        """Whether these shapes are the ones written out below."""
        raise NotImplementedError

    def losses(self, prediction: Tensor, target: Tensor) -> Tensor:  # -> [T]
        raise NotImplementedError

    def metrics(self, prediction: Tensor, target: Tensor, losses: Tensor) -> Tensor:
        """Each task's metric [T] (``losses``: each task's loss, computed already)."""
        raise NotImplementedError

    def gradient(self, prediction: Tensor, target: Tensor) -> Tensor:
        """d losses[t] / d prediction[t], stacked like ``prediction``."""
        raise NotImplementedError

    def hessian_product(self, prediction: Tensor, target: Tensor, tangent: Tensor) -> Tensor:
        """The second derivative of losses[t] in prediction[t] times tangent[t]."""
        raise NotImplementedError


class StackedMSE(StackedLoss):
    """``F.mse_loss`` of each task: the mean over its N x ... values."""

    def fits(self, prediction: Tensor, target: Tensor) -> bool:
        return prediction.dim() >= 2 and prediction.shape == target.shape

    def losses(self, prediction: Tensor, target: Tensor) -> Tensor:
        return (prediction - target).square().flatten(1).mean(1)

    def metrics(self, prediction: Tensor, target: Tensor, losses: Tensor) -> Tensor:
        return losses

    def gradient(self, prediction: Tensor, target: Tensor) -> Tensor:
        return (prediction - target) * (2.0 * prediction.shape[0] / prediction.numel())

    def hessian_product(self, prediction: Tensor, target: Tensor, tangent: Tensor) -> Tensor:
        return tangent * (2.0 * prediction.shape[0] / prediction.numel())


class StackedCrossEntropy(StackedLoss):
    """``F.cross_entropy`` of each task's logits [N, C] and labels [N], and its accuracy."""

    def fits(self, prediction: Tensor, target: Tensor) -> bool:
        return prediction.dim() == 3 and target.shape == prediction.shape[:2]

    def losses(self, prediction: Tensor, target: Tensor) -> Tensor:
        picked = prediction.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [T, N]
        return (prediction.logsumexp(-1) - picked).mean(1)

    def metrics(self, prediction: Tensor, target: Tensor, losses: Tensor) -> Tensor:
        return (prediction.argmax(-1) == target).to(prediction.dtype).mean(1)

    def gradient(self, prediction: Tensor, target: Tensor) -> Tensor:
        # (softmax - one-hot) / N; the one-hot by comparison: F.one_hot refuses vmap
        classes = torch.arange(prediction.shape[-1], device=target.device)
        one_hot = (target.unsqueeze(-1) == classes).to(prediction.dtype)
        return (prediction.softmax(-1) - one_hot) / prediction.shape[1]

    def hessian_product(self, prediction: Tensor, target: Tensor, tangent: Tensor) -> Tensor:
        # (diag(p) - p p^T) tangent / N, per example
        p = prediction.softmax(-1)
        pt = p * tangent
        return (pt - p * pt.sum(-1, keepdim=True)) / prediction.shape[1]


def split_generator(seed: int, split: str) -> torch.Generator:
    """The task stream of one split: a function of (seed, split) alone, never of the algorithm.

    So every algorithm run with the same seed and task settings meets the same validation
    and test tasks, and comparisons between them are paired.
    """
    digest = hashlib.sha256(f"metacli:{seed}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class ClassificationConfig(TaskConfig):
    ways: int = 5
    shots: int = 1
    queries: int = 15
    test_ways: int | None = None  # null = ways (ProtoNets train with more ways than they test)
    # shuffled: a task's classes get labels 0..N-1 in random order (mutually exclusive
    # tasks); fixed: class c always has label c mod N, so one network can memorise every
    # class (the non-mutually-exclusive tasks of Yin et al. 2020)
    labels: str = "shuffled"
    # training images' augmentation, drawn per task: none | standard | crop_flip |
    # resized_crop (metacli.tasks.images.augment)
    augment: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.augment in AUGMENTATIONS,
            "task.augment",
            self.augment,
            f"choose {', '.join(AUGMENTATIONS)}",
        )
        require(
            self.labels in ("shuffled", "fixed"),
            "task.labels",
            self.labels,
            "choose shuffled or fixed",
        )
        one_way = "a 1-way task has a single answer, which every model scores 1.0 on"
        require(self.ways >= 2, "task.ways", self.ways, f"it must be >= 2 ({one_way})")
        require(
            self.test_ways is None or self.test_ways >= 2,
            "task.test_ways",
            self.test_ways,
            f"it must be >= 2 or null ({one_way})",
        )


class ClassificationTask(TaskDistribution):
    """N-way K-shot episodes: labels 0..N-1, cross-entropy loss, accuracy metric."""

    cfg: ClassificationConfig
    metric_name = "accuracy"
    higher_is_better = True
    is_classification = True
    stacked_loss = StackedCrossEntropy()

    @property
    def output_dim(self) -> int:  # type: ignore[override]
        return self.cfg.ways

    @classmethod
    def outputs_of(cls, cfg: TaskConfig) -> int:
        assert isinstance(cfg, ClassificationConfig)
        return cfg.ways

    def ways(self, split: str) -> int:
        if split != "train" and self.cfg.test_ways is not None:
            return self.cfg.test_ways
        return self.cfg.ways

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(prediction, target)

    def metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        return (prediction.argmax(dim=-1) == target).to(prediction.dtype).mean()

    # --- non-episodic training (Baseline, Baseline++, RFS) ----------------------------------
    def train_classes(self) -> int:
        """Classes of the training split: the global labels 0..n-1 of ``sample_examples``."""
        raise ConfigError(
            f"task={self.cfg.name} cannot serve non-episodic training (mini-batches of "
            f"images with their classes' global labels), which algo=baseline, baselinepp "
            f"and rfs train with. Choose task=omniglot, miniimagenet, image_folder or "
            f"synthetic."
        )

    def sample_examples(self, size: int, generator: torch.Generator, augment: bool) -> TaskBatch:
        """A mini-batch of ``size`` training images drawn uniformly from all the training
        classes, labelled by class (0..train_classes()-1): one "task" whose support is the
        batch and whose query is empty. ``augment``: random crops, flips, colour jitter."""
        self.train_classes()  # (says why this task cannot)
        raise NotImplementedError


def examples_batch(x: Tensor, y: Tensor) -> TaskBatch:
    """A non-episodic mini-batch (images [N, ...], labels [N]) as a one-task TaskBatch."""
    return TaskBatch(x[None], y[None], x[None, :0], y[None, :0])


def choose_classes(
    n_classes: int, ways: int, num_tasks: int, labels: str, generator: torch.Generator
) -> Tensor:
    """The classes of each task, in label order: [B, ways] indices into the split's classes.

    ``shuffled``: ``ways`` distinct classes at random, so a class's label changes from task
    to task. ``fixed``: label k always comes from the classes c with c mod ways == k, so
    every class keeps one label across all tasks of the split.
    """
    if labels == "fixed":
        groups = torch.tensor([(n_classes - k + ways - 1) // ways for k in range(ways)])
        pick = (torch.rand(num_tasks, ways, generator=generator) * groups).long()
        return torch.arange(ways) + ways * pick.clamp_max(groups - 1)
    return torch.stack(
        [torch.randperm(n_classes, generator=generator)[:ways] for _ in range(num_tasks)]
    )


def episodes(images: Tensor, shots: int) -> TaskBatch:
    """Class-major examples [B, ways, S+Q, ...] -> support (first S) and query, labelled."""
    num_tasks, ways, per_class = images.shape[:3]
    return TaskBatch(
        images[:, :, :shots].flatten(1, 2),  # [B, ways*S, ...]
        episode_labels(num_tasks, ways, shots),
        images[:, :, shots:].flatten(1, 2),  # [B, ways*Q, ...]
        episode_labels(num_tasks, ways, per_class - shots),
    )


def episode_labels(num_tasks: int, ways: int, per_class: int) -> Tensor:
    """Labels [B, ways * per_class]: 0,0,..,1,1,.. (class-major, as episodes are laid out)."""
    return torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1).clone()
