"""Any folder of class subfolders as a few-shot task distribution: the custom-dataset path.

``data.root/<class>/*.{png,jpg,...}``. Classes are split into train / val / test either
by class lists (``task.split_dir`` with ``train.txt``, ``val.txt``, ``test.txt``, one class
name a line) or by seeded ratios of the classes (``task.ratios``, ``task.split_seed``).
Images are resized to ``task.image_size`` with ``task.channels`` (1 = grey, 3 = RGB),
scaled to [0, 1], and cached like the built-in datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metacli.config import require, require_seed
from metacli.console import track
from metacli.errors import MetacliError
from metacli.tasks.base import SPLITS, ClassificationConfig, TaskConfig
from metacli.tasks.images import (
    ClassSet,
    ImageClassTask,
    cache_dir,
    cached,
    class_folders,
    decode_image,
    uneven,
    warn_problems,
)


@dataclass
class ImageFolderConfig(ClassificationConfig):
    name: str = "image_folder"
    image_size: int = 84
    channels: int = 3
    split_dir: str | None = None  # folder of train.txt / val.txt / test.txt class lists
    ratios: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.20])
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_seed("task.split_seed", self.split_seed)
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(self.channels in (1, 3), "task.channels", self.channels, "choose 1 or 3")
        require(
            len(self.ratios) == 3
            and all(r >= 0 for r in self.ratios)
            and abs(sum(self.ratios) - 1) < 1e-6,
            "task.ratios",
            self.ratios,
            "three non-negative fractions (train, val, test) summing to 1",
        )


class ImageFolder(ImageClassTask, key="image_folder"):
    Config = ImageFolderConfig
    cfg: ImageFolderConfig

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, ImageFolderConfig)
        return (cfg.channels, cfg.image_size, cfg.image_size)

    def __init__(
        self, cfg: ImageFolderConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root or not Path(data_root).expanduser().is_dir():
            raise MetacliError(
                f"task=image_folder reads data.root/<class>/<image> files, but "
                f"data.root={data_root!r} is not a folder. Set data.root."
            )
        self.root = Path(data_root).expanduser()
        self.layout = "class folders"
        files = class_folders(self.root)
        if not files:
            raise MetacliError(
                f"{self.root} has no class subfolders holding images "
                f"({self.root}/<class>/<image>.png or .jpg). Check data.root."
            )
        stamp = [
            (name, len(paths), int(max(p.stat().st_mtime for p in paths)))
            for name, paths in files.items()
        ]

        def build() -> dict[str, Any]:
            every = [p for paths in files.values() for p in paths]
            images = [
                decode_image(p.read_bytes(), cfg.image_size, cfg.channels, str(p))
                for p in track(every, "decoding images")
            ]
            return {
                "images": torch.stack(images),
                "classes": {n: [str(p) for p in ps] for n, ps in files.items()},
            }

        key = {
            "root": str(self.root.resolve()),
            "source": stamp,
            "size": cfg.image_size,
            "channels": cfg.channels,
        }
        data = cached(cache_dir(cache_folder), "image_folder", key, build)
        self.images = data["images"]
        rows, start = {}, 0  # each class's images, in the order they were decoded
        for name, paths in data["classes"].items():
            rows[name] = list(range(start, start + len(paths)))
            start += len(paths)
        names = list(rows)
        self.problems = uneven(names, [len(rows[n]) for n in names])
        warn_problems(self.problems)
        self.splits = {}
        for split, members in self.split_classes(names).items():
            self.splits[split] = ClassSet.of([rows[m] for m in members], members)
        self.check_sizes()

    def split_classes(self, names: list[str]) -> dict[str, list[str]]:
        cfg = self.cfg
        if cfg.split_dir:
            folder, known, splits = Path(cfg.split_dir), set(names), {}
            for split in SPLITS:
                path = folder / f"{split}.txt"
                if not path.is_file():
                    raise MetacliError(
                        f"task.split_dir={folder} has no {split}.txt (one class name a line)."
                    )
                members = path.read_text().split()
                absent = [m for m in members if m not in known]
                if absent:
                    raise MetacliError(
                        f"{path} names the class {absent[0]}, which is not a "
                        f"subfolder of {self.root}."
                    )
                splits[split] = members
            return splits
        order = [
            names[i]
            for i in torch.randperm(
                len(names), generator=torch.Generator().manual_seed(cfg.split_seed)
            )
        ]
        n_train = round(cfg.ratios[0] * len(order))
        n_val = round(cfg.ratios[1] * len(order))
        return {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
