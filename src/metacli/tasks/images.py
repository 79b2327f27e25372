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
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metacli.console import track
from metacli.errors import MetacliError
from metacli.files import save_tensors
from metacli.lock import FolderLock
from metacli.streams import TaskRandom
from metacli.tasks import decoding
from metacli.tasks.base import (
    ClassificationTask,
    TaskBatch,
    choose_classes,
    episode_labels,
    examples_batch,
)
from metacli.tasks.decoding import Item, decode_chunk, decode_into, decode_pixels

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
        return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
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
    augments = True

    def images_of(self, split: str) -> Tensor:
        """The tensor a split's class indices point into (one for all splits here)."""
        return self.images

    def decoded(self) -> int:
        """Images decoded into the cache, all splits together."""
        return len(self.images)

    def augment_batch(self, batch: TaskBatch, keys: Tensor) -> TaskBatch:
        kind = self.cfg.augment
        if kind == "none":
            return batch
        sx, sy, qx, qy = batch.tensors()
        shots = sx.shape[1]
        images = torch.cat([sx, qx], dim=1)  # [B, S+Q, C, H, W]
        per_task = images.shape[1]
        draws = torch.stack([TaskRandom(k).uniform((per_task, DRAWS)) for k in keys.cpu()]).to(
            images.device
        )
        plain = images.flatten(0, 1) * self.std + self.mean  # back to [0, 1]
        out = augment(plain.clamp(0, 1), kind, draws.flatten(0, 1))
        out = ((out - self.mean) / self.std).view_as(images)
        return TaskBatch(out[:, :shots], sy, out[:, shots:], qy, batch.keys)

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
        turns = classes.turns[chosen]  # [B, ways]
        source = self.images_of(split)

        def gathered(part: Tensor) -> Tensor:  # support and query apart: no copy to split
            images = source[part]  # uint8 [B, ways, n, C, H, W]
            for k in (1, 2, 3):
                mask = turns == k
                if mask.any():
                    images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
            return self.scaled(images).flatten(1, 2)  # [B, ways * n, C, H, W]

        return TaskBatch(
            gathered(index[:, :, :shots]),
            episode_labels(num_tasks, ways, shots),
            gathered(index[:, :, shots:]),
            episode_labels(num_tasks, ways, queries),
        )

    def scaled(self, images: Tensor) -> Tensor:
        """uint8 pixels -> (x / 255 - mean) / std in float32, in place after one copy."""
        out = images.float().div_(255)
        if isinstance(self.mean, Tensor) or self.mean != 0.0:
            out.sub_(self.mean)
        if isinstance(self.std, Tensor) or self.std != 1.0:
            out.div_(self.std)
        return out

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
        images = self.images_of("train")[image_of[pick]].float().div_(255)  # [N, C, H, W]
        turns = classes.turns[labels]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        if augment:
            images = augmented(images, generator)
        return examples_batch((images - self.mean) / self.std, labels)


# torchvision's RandomResizedCrop defaults: the crop's share of the area, its aspect ratio
RESIZED_SCALE = (0.08, 1.0)
RESIZED_RATIO = (3 / 4, 4 / 3)
DRAWS = 10  # uniforms an image's augmentation takes (columns of ``draws`` below)


def padding_for(size: int) -> int:
    """The crop padding of the papers' code: 4 pixels at 32 x 32 (RFS's and MetaOptNet's
    CIFAR), 8 at 84 x 84 (their ImageNet derivatives), in proportion between and above."""
    return 4 if size <= 32 else max(1, round(8 * size / 84))


def augment(images: Tensor, kind: str, draws: Tensor, jitter: float = 0.4) -> Tensor:
    """One of ``AUGMENTATIONS`` applied to images in [0, 1] [N, C, H, W], each image's
    randomness read from its row of ``draws`` [N, DRAWS] (uniforms in (0, 1)), so that a
    caller decides which random stream each image draws from.

    - ``standard`` (MetaOptNet's and RFS's ``RandomCrop(size, padding)``, ``ColorJitter(0.4,
      0.4, 0.4)``, ``RandomHorizontalFlip``): a crop of the zero-padded image, brightness,
      contrast and saturation each scaled by a factor from [1 - jitter, 1 + jitter] on colour
      images, and a flip with probability 1/2;
    - ``crop_flip``: the crop and the flip alone;
    - ``resized_crop`` (CloserLookFewShot's ``train_aug``): a crop of 8-100% of the area with
      an aspect ratio in [3/4, 4/3], resized back bilinearly, then the jitter and the flip.
    """
    if kind == "none":
        return images
    n, channels, height, width = images.shape
    if kind == "resized_crop":
        out = resized_crops(images, draws[:, 6:10])
    else:
        pad = padding_for(height)
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = (draws[:, 0] * (2 * pad + 1)).long().clamp_max(2 * pad)
        dx = (draws[:, 1] * (2 * pad + 1)).long().clamp_max(2 * pad)
        rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
        out = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(channels)[None, :, None, None],
            rows,
            cols,
        ]
    if channels == 3 and jitter > 0 and kind != "crop_flip":
        out = colour_jitter(out, draws[:, 3:6], jitter)
    flip = draws[:, 2] < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def resized_crops(images: Tensor, draws: Tensor) -> Tensor:
    """RandomResizedCrop drawn in one go on square images: area share and log aspect ratio
    uniform, the crop clipped to the image (torchvision retries 10 times instead),
    resampled bilinearly."""
    n = images.shape[0]
    low, high = RESIZED_SCALE
    area = low + (high - low) * draws[:, 0]
    log_ratio = math.log(RESIZED_RATIO[0]) + draws[:, 1] * math.log(
        RESIZED_RATIO[1] / RESIZED_RATIO[0]
    )
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp_max(1.0)  # fractions of the image's width and height
    h = torch.sqrt(area / ratio).clamp_max(1.0)
    x0 = draws[:, 2] * (1 - w)
    y0 = draws[:, 3] * (1 - h)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = w, h  # [-1, 1] output -> the crop's box in the input
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def colour_jitter(images: Tensor, draws: Tensor, jitter: float) -> Tensor:
    """Brightness, contrast and saturation, each by a factor in [1 - jitter, 1 + jitter]."""
    factors = (1 + jitter * (2 * draws - 1)).view(-1, 3, 1, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    out = (images * factors[:, 0]).clamp(0, 1)  # brightness
    mean = (out * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    out = (mean + factors[:, 1] * (out - mean)).clamp(0, 1)  # contrast
    gray = (out * luma).sum(1, keepdim=True)
    return (gray + factors[:, 2] * (out - gray)).clamp(0, 1)  # saturation


def augmented(images: Tensor, generator: torch.Generator, jitter: float = 0.4) -> Tensor:
    """The non-episodic baselines' own augmentation (``algo.augment``): ``standard`` on
    colour images, its crops and flips on the rest, drawn from ``generator``."""
    draws = torch.rand(images.shape[0], DRAWS, generator=generator)
    return augment(images, "standard", draws, jitter)


RESAMPLING = ("lanczos", "nearest")
PARALLEL_FROM = 2000  # fewer images decode faster in this process than a pool starts


def resized(images: Tensor, size: int) -> Tensor:
    """uint8 images [N, C, H, W] resized to size x size (bilinear, antialiased), for the
    releases that ship decoded arrays (pickles, .npz); unchanged at that size already."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def decode_image(data: bytes, size: int, channels: int, name: str, **options: Any) -> Tensor:
    """Image bytes -> uint8 [channels, size, size] (``options``: ``decode_pixels``')."""
    pixels = decode_pixels(data, size, channels, name, **options)
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(channels, size, size)


def decode_many(
    sources: Sequence[Item],
    size: int,
    channels: int,
    description: str,
    workers: int | None = None,
    **options: Any,
) -> Tensor:
    """Decode images into one uint8 tensor [N, channels, size, size], over the CPU's cores
    (``workers``: processes, default all cores), with a progress bar; the first image
    that fails is named in the error."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    count = len(sources)
    out = torch.empty(count, channels, size, size, dtype=torch.uint8)
    options = {"size": size, "channels": channels, **options}
    workers = workers or os.cpu_count() or 1
    chunk = 256
    starts = list(range(0, count, chunk))
    description = f"{description} ({count:,} images, in blocks of {chunk})"
    if workers <= 1 or count < PARALLEL_FROM:
        for start in track(starts, description):
            for i, pixels in enumerate(decode_chunk(sources[start : start + chunk], options)):
                out[start + i] = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(
                    channels, size, size
                )
        return out
    if not sys.platform.startswith("linux"):  # spawned workers: sources and pixels piped
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(decode_chunk, sources[s : s + chunk], options) for s in starts]
            for start, future in zip(starts, track(futures, description), strict=True):
                for i, pixels in enumerate(future.result()):
                    out[start + i] = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(
                        channels, size, size
                    )
        return out
    # Forked (as torch's DataLoader workers), before the progress bar's thread starts: the
    # workers inherit the sources and write pixels into an anonymous shared mapping (not
    # /dev/shm, which containers keep small); they run PIL and metacli.tasks.decoding
    # alone, never torch.
    import mmap

    target = mmap.mmap(-1, max(1, count * channels * size * size))
    decoding.FORKED.update(sources=sources, target=target)
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(decode_into, s, min(s + chunk, count), options) for s in starts]
            for future in track(futures, description):
                future.result()
    finally:
        decoding.FORKED.clear()
    out.copy_(torch.frombuffer(target, dtype=torch.uint8, count=out.numel()).view_as(out))
    target.close()
    return out


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
