"""What the image task distributions share: a uint8 cache and episode sampling by index.

A dataset is decoded once into one compact uint8 tensor (``images`` [N, C, H, W]) with,
for each split, the list of its classes: the indices of the class's images and a
rotation in quarter turns. Episodes gather from that tensor, so sampling costs
microseconds per image instead of a PNG decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metacli.errors import MetacliError
from metacli.files import save_tensors
from metacli.lock import FolderLock
from metacli.tasks.base import ClassificationTask, TaskBatch, episodes

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_dir(configured: str | None) -> Path:
    """``data.cache_dir``, else $METACLI_CACHE, else ~/.cache/metacli (never the data folder)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("METACLI_CACHE"):
        return Path(os.environ["METACLI_CACHE"]).expanduser()
    return Path.home() / ".cache" / "metacli"


def cached(
    folder: Path, name: str, key: dict[str, Any], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Load the cache entry for ``key`` or build it, written atomically.

    One process builds an entry; another that needs it meanwhile waits for the builder's
    lock and then reads the finished file (a kill leaves no lock and no torn file).
    """
    digest = hashlib.sha256(
        json.dumps({**key, "version": CACHE_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = folder / f"{name}-{digest}.pt"
    data = read_cache(path)
    if data is not None:
        return data
    try:
        with FolderLock(folder / f".{path.name}.lock", f"building {path.name}", wait=True):
            data = read_cache(path)  # built by the process we waited for
            if data is not None:
                return data
            log.info("Building the %s cache in %s (once)", name, path)
            data = build()
            save_tensors(path, data)
    except OSError as err:
        raise MetacliError(
            f"Cannot write the dataset cache in {folder}: {err.strerror or err}. Set "
            f"data.cache_dir (or METACLI_CACHE) to a writable folder."
        ) from None
    return data


def read_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a cache file of another version, or damaged on disk
        log.warning("Rebuilding the unreadable cache file %s", path)
        return None


@dataclass
class ClassSet:
    """The classes of one split: image indices [n_classes, per_class], quarter turns."""

    indices: Tensor  # [n_classes, per_class] into the images tensor
    turns: Tensor  # [n_classes] rotation in multiples of 90 degrees

    def __len__(self) -> int:
        return self.indices.shape[0]


class ImageClassTask(ClassificationTask):
    """N-way K-shot episodes drawn from a uint8 image tensor."""

    images: Tensor  # [N, C, H, W] uint8
    splits: dict[str, ClassSet]
    mean: float | Tensor = 0.0  # per channel: [C, 1, 1]
    std: float | Tensor = 1.0

    def check_sizes(self) -> None:
        for split, classes in self.splits.items():
            ways = self.ways(split)
            if len(classes) < ways:
                raise MetacliError(
                    f"The {split} split has {len(classes)} classes, fewer than "
                    f"ways={ways}. Lower task.ways (or task.test_ways)."
                )
            need = self.shots(split) + self.cfg.queries
            if classes.indices.shape[1] < need:
                raise MetacliError(
                    f"Classes of the {split} split have {classes.indices.shape[1]} images, fewer "
                    f"than shots + queries = {need}. Lower task.shots or task.queries."
                )

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        classes = self.splits[split]
        ways, shots, queries = self.ways(split), self.shots(split), self.cfg.queries
        per_class = shots + queries
        chosen = torch.stack(
            [torch.randperm(len(classes), generator=generator)[:ways] for _ in range(num_tasks)]
        )  # [B, ways]
        available = classes.indices.shape[1]
        picks = torch.stack(
            [
                torch.randperm(available, generator=generator)[:per_class]
                for _ in range(num_tasks * ways)
            ]
        ).view(num_tasks, ways, per_class)
        index = classes.indices[chosen.unsqueeze(-1), picks]  # [B, ways, S+Q]
        images = self.images[index].float().div_(255)  # [B, ways, S+Q, C, H, W]
        turns = classes.turns[chosen]  # [B, ways]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        return episodes((images - self.mean) / self.std, shots)


def decode_image(data: bytes, size: int, channels: int, name: str) -> Tensor:
    """Image bytes -> uint8 [channels, size, size], resized with LANCZOS when needed."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
    except Exception as err:
        raise MetacliError(
            f"Cannot read the image {name}: {err}. Replace or remove that file."
        ) from None
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, channels).permute(2, 0, 1).contiguous()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def class_folders(root: Path) -> dict[str, list[Path]]:
    """{class name: sorted image files} for every subfolder of ``root`` holding images."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[folder.name] = files
    return classes


def stack_classes(
    classes: dict[str, list[Any]],
    per_class: int | None = None,
) -> tuple[Tensor, list[str]]:
    """Image-index table [n_classes, per_class] for classes listed in image order."""
    names, rows, start = [], [], 0
    for name, items in classes.items():
        count = len(items)
        names.append(name)
        rows.append(list(range(start, start + count)))
        start += count
    smallest = min(len(r) for r in rows)
    width = smallest if per_class is None else min(per_class, smallest)
    return torch.tensor([r[:width] for r in rows], dtype=torch.long), names
