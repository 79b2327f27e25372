"""Synthetic few-shot image classification: no data files, any shape.

Each split owns a fixed pool of class templates (smooth random images, seeded by the
split alone); an example is its class template plus Gaussian noise. It exercises the
image pipeline end to end (smoke tests, benchmarks, debugging a new algorithm) where
Omniglot or mini-ImageNet are not at hand; it is not a benchmark of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metacli.config import require
from metacli.tasks.base import (
    SPLITS,
    ClassificationConfig,
    ClassificationTask,
    TaskBatch,
    TaskConfig,
    choose_classes,
    episodes,
    examples_batch,
    split_generator,
)
from metacli.tasks.images import augmented


@dataclass
class SyntheticConfig(ClassificationConfig):
    name: str = "synthetic"
    channels: int = 1
    image_size: int = 28
    classes: int = 64  # templates per split
    noise: float = 0.5  # std of the per-example noise (templates have std ~1)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.channels >= 1, "task.channels", self.channels, "it must be >= 1")
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(self.noise >= 0, "task.noise", self.noise, "it must be >= 0")
        most_ways = max(self.ways, self.test_ways or 0)
        require(
            self.classes >= most_ways,
            "task.classes",
            self.classes,
            f"each split needs at least ways={most_ways} classes",
        )


class Synthetic(ClassificationTask, key="synthetic"):
    Config = SyntheticConfig
    cfg: SyntheticConfig

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, SyntheticConfig)
        return (cfg.channels, cfg.image_size, cfg.image_size)

    def __init__(
        self, cfg: SyntheticConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        coarse = max(cfg.image_size // 4, 2)
        self.templates = {}
        for split in SPLITS:
            gen = split_generator(0, f"synthetic-templates-{split}")
            low = torch.randn(cfg.classes, cfg.channels, coarse, coarse, generator=gen)
            self.templates[split] = F.interpolate(
                low, size=cfg.image_size, mode="bilinear", align_corners=False
            )

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        ways, shots, queries = self.ways(split), self.shots(split), self.queries(split)
        pool = self.templates[split]
        classes = choose_classes(len(pool), ways, num_tasks, self.cfg.labels, generator)
        templates = pool[classes]  # [B, ways, C, H, W]
        per_class = shots + queries
        noise = torch.randn(num_tasks, ways, per_class, *self.input_shape, generator=generator)
        images = templates.unsqueeze(2) + self.cfg.noise * noise  # [B, ways, S+Q, C, H, W]
        return episodes(images, shots)

    def train_classes(self) -> int:
        return self.cfg.classes

    def sample_examples(self, size: int, generator: torch.Generator, augment: bool) -> TaskBatch:
        labels = torch.randint(self.cfg.classes, (size,), generator=generator)
        noise = torch.randn(size, *self.input_shape, generator=generator)
        images = self.templates["train"][labels] + self.cfg.noise * noise
        if augment:  # (crops and flips; the templates are not images in [0, 1])
            images = augmented(images, generator, jitter=0.0)
        return examples_batch(images, labels)
