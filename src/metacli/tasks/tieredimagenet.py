"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 categories, split by category
20 / 6 / 8 (351 / 97 / 160 classes), 84 x 84.

Layouts under ``data.root`` (or $METACLI_DATA; also its ``tiered-imagenet/`` subfolder),
looked for in this order:
- ``{train,val,test}_images.npz`` (``images`` [N, 84, 84, 3] uint8), the arrays MetaOptNet
  and RFS read;
- ``{train,val,test}_images_png.pkl``, the original release: a list of PNGs written by
  ``cv2.imencode``, decoded here as the release's loaders decode them (``cv2.imdecode``:
  channels in the order the arrays were written, so both releases give the same pixels);
- both with ``{split}_labels.pkl``: ``label_specific`` (each image's class within its split)
  with the names ``label_specific_str``, or MetaOptNet's ``labels``;
- class folders ``{train,val,test}/<wnid>/*.jpg``.
Each split is decoded once into its own cache file (read memory-mapped), so no step holds
the 16.5 GB of decoded images at once. Images are scaled to [0, 1] and (``normalize:
tiered``, MetaOptNet's and RFS's code) normalised with their channel statistics.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metacli.config import require
from metacli.errors import MetacliError
from metacli.tasks.base import SPLITS, ClassificationConfig, TaskConfig
from metacli.tasks.images import (
    ClassSet,
    ImageClassTask,
    Item,
    cache_dir,
    cached,
    class_folders,
    decode_many,
    resized,
)
from metacli.tasks.pickles import load_pickle, require_keys

MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))
LABELS = "tieredImageNet labels file"


@dataclass
class TieredImageNetConfig(ClassificationConfig):
    name: str = "tieredimagenet"
    image_size: int = 84
    normalize: str = "tiered"  # tiered (channel means and stds) | none ([0, 1])

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(
            self.normalize in ("tiered", "none"),
            "task.normalize",
            self.normalize,
            "choose tiered or none",
        )


def find_layout(root: Path) -> tuple[str, Path]:
    for place in (root, root / "tiered-imagenet"):
        for layout, pattern in (("npz", "{}_images.npz"), ("png pickles", "{}_images_png.pkl")):
            found = [place / pattern.format(s) for s in SPLITS]
            if any(p.is_file() for p in found):
                missing = [p for p in found if not p.is_file()]
                missing += [
                    place / f"{s}_labels.pkl"
                    for s in SPLITS
                    if not (place / f"{s}_labels.pkl").is_file()
                ]
                if missing:
                    raise MetacliError(
                        f"tieredImageNet's {layout} release in {place} lacks {missing[0].name}. "
                        f"Restore it from the release (each split needs its images and its "
                        f"labels file)."
                    )
                return layout, place
        if all((place / s).is_dir() for s in SPLITS):
            return "folders", place
    raise MetacliError(
        f"No tieredImageNet found in data.root={root}. Looked for: "
        f"{{train,val,test}}_images.npz or {{train,val,test}}_images_png.pkl with "
        f"{{train,val,test}}_labels.pkl (in {root} or {root / 'tiered-imagenet'}); "
        f"{root}/train/<wnid>/, val/, test/ (class folders). Set data.root to the folder that "
        f"holds one of them."
    )


def read_labels(path: Path, count: int) -> tuple[list[int], list[str]]:
    """Each image's class within the split, and the classes' names."""
    data = load_pickle(path, LABELS)
    if isinstance(data, dict) and "label_specific" in data:
        labels = [int(v) for v in data["label_specific"]]
        names = [
            n.decode("latin1") if isinstance(n, bytes) else str(n)
            for n in data.get("label_specific_str", [])
        ]
    else:
        labels = [int(v) for v in require_keys(data, ("labels",), str(path), LABELS)["labels"]]
        names = []
    if len(labels) != count:
        raise MetacliError(
            f"{path} labels {len(labels)} images, but its images file holds {count}. Restore "
            f"both from the same release."
        )
    return labels, names


def npz_chunks(path: Path, key: str, rows: int = 4096) -> tuple[tuple[int, ...], Iterator[Any]]:
    """An ``.npz`` member's shape and its rows in chunks, read from the archive as a stream
    (``numpy.load`` would hold the whole array, and a copy of it, in memory)."""
    import numpy
    from numpy.lib import format as npy

    try:
        archive = zipfile.ZipFile(path)
        handle = archive.open(f"{key}.npy")
        version = npy.read_magic(handle)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
    except KeyError:
        raise MetacliError(
            f"{path} has no '{key}' array. Replace it with the release's file."
        ) from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise MetacliError(
            f"Cannot read {path}: it is damaged or not a numpy archive ({err}). Replace it "
            f"with the release's file."
        ) from None
    if fortran or dtype != numpy.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise MetacliError(
            f"{path} holds '{key}' of shape {shape} ({dtype}), not N x H x W x 3 uint8 images. "
            f"Replace it with the release's file."
        )
    row_bytes = int(numpy.prod(shape[1:]))

    def chunks() -> Iterator[Any]:
        with archive, handle:
            for start in range(0, shape[0], rows):
                count = min(rows, shape[0] - start)
                try:
                    data = handle.read(count * row_bytes)
                except (OSError, zipfile.BadZipFile, EOFError) as err:
                    data, reason = b"", str(err)
                else:
                    reason = "it ends early"
                if len(data) != count * row_bytes:
                    raise MetacliError(
                        f"Cannot read {path}: {reason} (image {start} of {shape[0]}). Replace "
                        f"it with the release's file."
                    )
                yield numpy.frombuffer(data, dtype=numpy.uint8).reshape(count, *shape[1:])

    return tuple(shape), chunks()


def read_split(layout: str, place: Path, split: str, size: int) -> dict[str, Any]:
    """One split as {"images": uint8 [N, 3, size, size], "classes": {name: [indices]}}."""
    if layout == "folders":
        files = class_folders(place / split)
        sources: list[Item] = []
        classes: dict[str, list[int]] = {}
        for name, paths in files.items():
            classes[name] = list(range(len(sources), len(sources) + len(paths)))
            sources += [(p, str(p)) for p in paths]
        images = decode_many(sources, size, 3, f"decoding tieredImageNet {split}")
        return {"images": images, "classes": classes}
    if layout == "npz":
        path = place / f"{split}_images.npz"
        shape, chunks = npz_chunks(path, "images")
        images = torch.empty(shape[0], 3, size, size, dtype=torch.uint8)
        start = 0
        for chunk in chunks:
            block = resized(torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2), size)
            images[start : start + len(block)] = block
            start += len(block)
    else:
        path = place / f"{split}_images_png.pkl"
        pngs = load_pickle(path, "tieredImageNet images file (a list of PNGs)")
        if not isinstance(pngs, list):
            raise MetacliError(
                f"{path} holds a {type(pngs).__name__}, not the release's list of PNG images. "
                f"Replace it with the release's file."
            )
        sources = [
            (p if isinstance(p, bytes) else bytes(memoryview(p)), f"{i} of {path}")
            for i, p in enumerate(pngs)
        ]
        del pngs
        images = decode_many(sources, size, 3, f"decoding tieredImageNet {split}", swap=True)
    labels, names = read_labels(place / f"{split}_labels.pkl", len(images))
    rows: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    named = {(names[k] if k < len(names) else f"{split} class {k}"): rows[k] for k in sorted(rows)}
    return {"images": images, "classes": named}


class TieredImageNet(ImageClassTask, key="tieredimagenet"):
    Config = TieredImageNetConfig
    cfg: TieredImageNetConfig
    stored_images = 448695  # the training split; the others are mapped from their files

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, TieredImageNetConfig)
        return (3, cfg.image_size, cfg.image_size)

    def images_of(self, split: str) -> torch.Tensor:
        return self.split_images[split]

    def decoded(self) -> int:
        return sum(len(images) for images in self.split_images.values())

    def __init__(
        self,
        cfg: TieredImageNetConfig,
        data_root: str | None = None,
        cache_folder: str | None = None,
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root:
            raise MetacliError(
                "task=tieredimagenet needs its files: set data.root (or METACLI_DATA) to the "
                "tieredImageNet folder."
            )
        self.root = Path(data_root).expanduser()
        self.layout, place = find_layout(self.root)
        self.split_images: dict[str, torch.Tensor] = {}
        # (tieredImageNet's classes hold different numbers of images, as ImageNet's do)
        self.splits = {}
        self.problems: list[str] = []
        for split in SPLITS:
            files = (
                [place / split]
                if self.layout == "folders"
                else [place / f"{split}_labels.pkl"]
                + [p for p in place.glob(f"{split}_images*") if p.suffix in (".npz", ".pkl")]
            )
            stamp = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
            key = {"layout": self.layout, "source": stamp, "size": cfg.image_size, "split": split}
            data = cached(
                cache_dir(cache_folder),
                f"tieredimagenet-{split}",
                key,
                functools.partial(read_split, self.layout, place, split, cfg.image_size),
            )
            self.split_images[split] = data["images"]  # memory-mapped: pages read as used
            names = list(data["classes"])
            rows = [list(data["classes"][n]) for n in names]
            self.splits[split] = ClassSet.of(rows, names)
        self.images = self.split_images["train"]
        if cfg.normalize == "tiered":
            self.mean = torch.tensor(MEAN).view(3, 1, 1)
            self.std = torch.tensor(STD).view(3, 1, 1)
        self.check_sizes()
