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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metacli.errors import MetacliError
from metacli.files import save_tensors
from metacli.lock import FolderLock
from metacli.tasks.base import (
    ClassificationTask,
    TaskBatch,
    choose_classes,
    episodes,
    examples_batch,
)

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
    data = read_cache(path, say=False)  # (said below, once, where it is rebuilt)
    if data is not None:
        return data
    lock = folder / f".{path.name}.lock"
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # what a failure removes
    try:
        with FolderLock(lock, f"building {path.name}", wait=True):
            data = read_cache(path)  # built by the process we waited for
            if data is not None:
                return data
            log.info("Building the %s cache in %s (once)", name, path)
            try:
                data = build()
                save_tensors(path, data)
            except BaseException:  # nothing left behind by a build that failed
                lock.unlink(missing_ok=True)
                for empty in made:
                    try:
                        empty.rmdir()
                    except OSError:
                        break
                raise
    except OSError as err:
        raise MetacliError(
            f"Cannot write the dataset cache in {folder}: {err.strerror or err}. Set "
            f"data.cache_dir (or METACLI_CACHE) to a writable folder."
        ) from None
    return data


def read_cache(path: Path, say: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a cache file of another version, or damaged on disk
        if say:
            log.warning("Rebuilding the unreadable cache file %s", path)
        return None


@dataclass
class ClassSet:
    """The classes of one split; each keeps all of its own images (counts may differ)."""

    indices: Tensor  # [n_classes, most images of a class] into images; -1 past a count
    turns: Tensor  # [n_classes] rotation in multiples of 90 degrees
    counts: Tensor  # [n_classes] images of each class
    names: list[str]  # [n_classes], for messages

    @classmethod
    def of(cls, rows: list[list[int]], names: list[str], turns: Tensor | None = None) -> ClassSet:
        width = max((len(r) for r in rows), default=0)
        table = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if turns is None:
            turns = torch.zeros(len(rows), dtype=torch.long)
        return cls(table, turns, counts, names)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def smallest(self) -> tuple[int, str]:
        """The fewest images of a class, and that class."""
        i = int(self.counts.argmin())
        return int(self.counts[i]), self.names[i]


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
            need = self.shots(split) + self.queries(split)
            fewest, name = classes.smallest()
            if fewest < need:
                short = int((classes.counts < need).sum())
                raise MetacliError(
                    f"The class {name} of the {split} split has {fewest} images, fewer than "
                    f"shots + queries = {need} ({short} of its {len(classes)} "
                    f"classes are that short). Lower task.shots or task.queries, or add images."
                )

    def sample(self, num_tasks: int, split: str, generator: torch.Generator) -> TaskBatch:
        classes = self.splits[split]
        ways, shots, queries = self.ways(split), self.shots(split), self.queries(split)
        per_class = shots + queries
        chosen = choose_classes(len(classes), ways, num_tasks, self.cfg.labels, generator)
        counts = classes.counts[chosen].flatten().tolist()  # each class draws from its own
        picks = torch.stack(
            [torch.randperm(n, generator=generator)[:per_class] for n in counts]
        ).view(num_tasks, ways, per_class)
        index = classes.indices[chosen.unsqueeze(-1), picks]  # [B, ways, S+Q]
        images = self.images[index].float().div_(255)  # [B, ways, S+Q, C, H, W]
        turns = classes.turns[chosen]  # [B, ways]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        return episodes((images - self.mean) / self.std, shots)

    def train_classes(self) -> int:
        return len(self.splits["train"])

    def sample_examples(self, size: int, generator: torch.Generator, augment: bool) -> TaskBatch:
        classes = self.splits["train"]
        if "_examples" not in self.__dict__:  # every (class, image) pair of the split, once
            valid = classes.indices >= 0
            self.__dict__["_examples"] = (valid.nonzero()[:, 0], classes.indices[valid])
        class_of, image_of = self.__dict__["_examples"]
        pick = torch.randint(len(class_of), (size,), generator=generator)
        labels = class_of[pick]
        images = self.images[image_of[pick]].float().div_(255)  # [N, C, H, W]
        turns = classes.turns[labels]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        if augment:
            images = augmented(images, generator)
        return examples_batch((images - self.mean) / self.std, labels)


def augmented(images: Tensor, generator: torch.Generator, jitter: float = 0.4) -> Tensor:
    """The training augmentation of the non-episodic baselines, on images in [0, 1]
    [N, C, H, W]: a random crop of the image padded by zeros (8 pixels at 84 x 84, scaled
    with the size: RFS's ``RandomCrop(84, padding=8)``), a horizontal flip with probability
    1/2, and on colour images brightness, contrast and saturation each scaled by a factor
    drawn from [1 - jitter, 1 + jitter] (``ColorJitter(0.4, 0.4, 0.4)``)."""
    n, channels, height, width = images.shape
    pad = max(1, round(8 * height / 84))
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    if channels == 3 and jitter > 0:

        def factor() -> Tensor:
            return (1 + jitter * (2 * torch.rand(n, generator=generator) - 1)).view(n, 1, 1, 1)

        gray = (out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (out * factor()).clamp(0, 1)  # brightness
        mean = gray.mean(dim=(2, 3), keepdim=True)
        out = (mean + factor() * (out - mean)).clamp(0, 1)  # contrast
        gray = (out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (gray + factor() * (out - gray)).clamp(0, 1)  # saturation
    return out


RESAMPLING = ("lanczos", "nearest")


def decode_image(
    data: bytes, size: int, channels: int, name: str, resample: str = "lanczos"
) -> Tensor:
    """Image bytes -> uint8 [channels, size, size], resized with LANCZOS (antialiased) or
    NEAREST (what PIL does to a 1-bit image whatever it is asked: MAML's binary Omniglot)."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.LANCZOS
            image = image.resize((size, size), method)
    except Exception as err:
        # (PIL names the in-memory buffer it read from, not the file: say what it found)
        reason = (
            re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__
        )
        raise MetacliError(
            f"Cannot read the image {name}: {reason}. Replace or remove that file."
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


def uneven(names: list[str], counts: list[int]) -> list[str]:
    """Problems worth a warning: classes with fewer images than most classes have."""
    if not counts:
        return []
    usual = max(set(counts), key=counts.count)
    return [
        f"{name} has {n} images, not {usual} like most classes (it uses its {n})"
        for name, n in zip(names, counts, strict=True)
        if n < usual
    ]


def warn_problems(problems: list[str]) -> None:
    """Say what is uneven in a dataset (``metacli data check`` lists all of it)."""
    for problem in problems[:5]:
        log.warning("dataset: %s", problem)
    if len(problems) > 5:
        log.warning(
            "dataset: %d more such problems (metacli data check lists them)", len(problems) - 5
        )
