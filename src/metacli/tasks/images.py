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
from metacli.tasks.base import ClassificationTask, TaskBatch, choose_classes, episodes

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
