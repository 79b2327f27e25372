"""What CIFAR-FS and FC100 share: CIFAR-100 read from the files researchers have.

Layouts under ``data.root`` (or $METACLI_DATA), looked for in this order:
- the split pickles of MetaOptNet and RFS: ``CIFAR_FS_{train,val,test}.pickle`` (CIFAR-FS)
  or ``FC100_{train,val,test}.pickle`` (FC100), or RFS's ``{train,val,test}.pickle``,
  each ``{"data": uint8 [N, 32, 32, 3], "labels": [N] CIFAR-100 fine labels}``;
- the original python release as distributed: the folder ``cifar-100-python/`` (``train``,
  ``test``, ``meta``; ``data.root`` may be that folder), or its ``cifar-100-python.tar.gz``,
  read without unpacking. Both of its parts are used (600 images a class); the split into
  meta-train / validation / meta-test classes is the task's (``cifarfs``, ``fc100``).
Every pickle goes through the restricted unpickler (``metacli.tasks.pickles``).
Images are 32 x 32 x 3, scaled to [0, 1] and (``normalize: cifar``, RFS's code)
normalised with CIFAR-100's channel means and standard deviations.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from metacli.config import require
from metacli.errors import MetacliError
from metacli.tasks.base import SPLITS, ClassificationConfig, TaskConfig
from metacli.tasks.images import (
    ClassSet,
    ImageClassTask,
    cache_dir,
    cached,
    resized,
    uneven,
    warn_problems,
)
from metacli.tasks.pickles import load_pickle, loads, require_keys

MEAN = (0.5071, 0.4867, 0.4408)  # RFS's dataset/cifar.py
STD = (0.2675, 0.2565, 0.2761)
RELEASE = "cifar-100-python"
RELEASE_PARTS = ("train", "test", "meta")


@dataclass
class Cifar100Config(ClassificationConfig):
    image_size: int = 32
    normalize: str = "cifar"  # cifar (channel means and stds) | none ([0, 1])

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(
            self.normalize in ("cifar", "none"),
            "task.normalize",
            self.normalize,
            "choose cifar or none",
        )


@dataclass
class Release:
    """The python release: every image [60000, 3, 32, 32] with its labels and names."""

    images: torch.Tensor
    fine: list[int]
    coarse: list[int]
    fine_names: list[str]
    coarse_names: list[str]


def read_release(place: Path) -> Release:
    """The folder ``cifar-100-python/`` or the ``.tar.gz`` that holds it."""
    parts: dict[str, Any] = {}
    what = "CIFAR-100 python release file"
    if place.is_dir():
        for part in RELEASE_PARTS:
            path = place / part
            if not path.is_file():
                raise MetacliError(
                    f"{place} lacks the file '{part}' of the CIFAR-100 python release (it "
                    f"holds train, test and meta). Restore it from cifar-100-python.tar.gz."
                )
            parts[part] = load_pickle(path, what)
    else:
        try:
            with tarfile.open(place, "r:gz") as archive:
                for part in RELEASE_PARTS:
                    member = f"{RELEASE}/{part}"
                    try:
                        handle = archive.extractfile(member)
                    except KeyError:
                        handle = None
                    if handle is None:
                        raise MetacliError(
                            f"{place} has no {member}: it is not the CIFAR-100 python "
                            f"release. Replace it with cifar-100-python.tar.gz as distributed."
                        )
                    parts[part] = loads(handle.read(), f"{place}:{member}", what)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise MetacliError(
                f"Cannot read {place}: it is damaged or not a .tar.gz ({err}). Replace it "
                f"with cifar-100-python.tar.gz as distributed."
            ) from None
    keys = ("data", "fine_labels", "coarse_labels")
    data = [require_keys(parts[p], keys, f"{place}/{p}", what) for p in ("train", "test")]
    meta = require_keys(
        parts["meta"], ("fine_label_names", "coarse_label_names"), f"{place}/meta", what
    )
    arrays = []
    for part, values in zip(("train", "test"), data, strict=True):
        array = torch.as_tensor(values["data"])
        if array.dtype != torch.uint8 or array.dim() != 2 or array.shape[1] != 3 * 32 * 32:
            raise MetacliError(
                f"{place}/{part} holds data of shape {tuple(array.shape)} ({array.dtype}), not "
                f"N x 3072 uint8 rows. Replace it with the release's file."
            )
        if not len(values["fine_labels"]) == len(values["coarse_labels"]) == len(array):
            raise MetacliError(
                f"{place}/{part} has {len(array)} images but {len(values['fine_labels'])} fine "
                f"and {len(values['coarse_labels'])} coarse labels. Replace it with the "
                f"release's file."
            )
        arrays.append(array.view(-1, 3, 32, 32))
    return Release(
        torch.cat(arrays),
        [int(v) for d in data for v in d["fine_labels"]],
        [int(v) for d in data for v in d["coarse_labels"]],
        [text(n) for n in meta["fine_label_names"]],
        [text(n) for n in meta["coarse_label_names"]],
    )


def text(name: Any) -> str:
    """A name as text (a Python 2 string may arrive as bytes)."""
    return name.decode("latin1") if isinstance(name, bytes) else str(name)


def read_split_pickle(path: Path) -> tuple[torch.Tensor, list[int]]:
    """A MetaOptNet / RFS split pickle: images [N, 3, 32, 32] and fine labels."""
    what = "CIFAR-FS / FC100 split pickle"
    data = require_keys(load_pickle(path, what), ("data", "labels"), str(path), what)
    array = torch.as_tensor(data["data"])
    if array.dtype != torch.uint8 or array.dim() != 4 or array.shape[-1] != 3:
        raise MetacliError(
            f"{path} holds data of shape {tuple(array.shape)} ({array.dtype}), not N x H x W x 3 "
            f"uint8 images. Replace it with the release's file."
        )
    labels = [int(v) for v in data["labels"]]
    if len(labels) != len(array):
        raise MetacliError(
            f"{path} has {len(array)} images but {len(labels)} labels. Replace it with the "
            f"release's file."
        )
    return array.permute(0, 3, 1, 2).contiguous(), labels


class Cifar100Task(ImageClassTask):
    """A few-shot split of CIFAR-100's classes; subclasses say which classes go where."""

    Config = Cifar100Config
    cfg: Cifar100Config
    stored_images = 60000  # 100 classes, 600 images each
    pickle_prefix: ClassVar[str]  # CIFAR_FS | FC100

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, Cifar100Config)
        return (3, cfg.image_size, cfg.image_size)

    @classmethod
    def split_classes(cls, release: Release) -> dict[str, list[int]]:
        """The fine labels of each split's classes."""
        raise NotImplementedError

    def __init__(
        self, cfg: Cifar100Config, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root:
            raise MetacliError(
                f"task={cfg.name} needs its files: set data.root (or METACLI_DATA) to the "
                f"folder of cifar-100-python/ (or its .tar.gz) or of the "
                f"{self.pickle_prefix}_*.pickle files."
            )
        self.root = Path(data_root).expanduser()
        self.layout, places = self.find_layout()
        stamp = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in places.values()]

        def build() -> dict[str, Any]:
            if self.layout == "pickles":
                images, tables, offset = [], {}, 0
                for split in SPLITS:
                    array, labels = read_split_pickle(places[split])
                    rows: dict[str, list[int]] = {}
                    for i, label in enumerate(labels):
                        rows.setdefault(str(label), []).append(offset + i)
                    tables[split] = {k: rows[k] for k in sorted(rows, key=int)}
                    images.append(array)
                    offset += len(array)
                return {"images": resized(torch.cat(images), cfg.image_size), "classes": tables}
            release = read_release(places["release"])
            members: dict[int, list[int]] = {}
            for i, label in enumerate(release.fine):
                members.setdefault(label, []).append(i)
            tables = {
                split: {release.fine_names[c]: members.get(c, []) for c in classes}
                for split, classes in self.split_classes(release).items()
            }
            return {"images": resized(release.images, cfg.image_size), "classes": tables}

        key = {"task": cfg.name, "layout": self.layout, "source": stamp, "size": cfg.image_size}
        data = cached(cache_dir(cache_folder), cfg.name, key, build)
        self.images = data["images"]
        if cfg.normalize == "cifar":
            self.mean = torch.tensor(MEAN).view(3, 1, 1)
            self.std = torch.tensor(STD).view(3, 1, 1)
        self.set_splits(data["classes"])

    def find_layout(self) -> tuple[str, dict[str, Path]]:
        root = self.root
        for pattern in (f"{self.pickle_prefix}_{{}}.pickle", "{}.pickle"):
            found = {s: root / pattern.format(s) for s in SPLITS}
            if all(p.is_file() for p in found.values()):
                return "pickles", found
            if pattern != "{}.pickle" and any(p.is_file() for p in found.values()):
                missing = next(p for p in found.values() if not p.is_file())
                raise MetacliError(
                    f"{root} holds {self.pickle_prefix} split pickles but not {missing.name}. "
                    f"Restore it from the same release (train, val and test are needed)."
                )
        for place in (root / RELEASE, root):
            if all((place / p).is_file() for p in RELEASE_PARTS):
                return "python release", {"release": place}
        archive = root / f"{RELEASE}.tar.gz"
        if archive.is_file():
            return "python release archive", {"release": archive}
        if (root / RELEASE).is_dir():  # the folder, with a part missing: say which
            return "python release", {"release": root / RELEASE}
        partial = [p.name for s in SPLITS for p in [root / f"{self.pickle_prefix}_{s}.pickle"]]
        raise MetacliError(
            f"No CIFAR-100 found in data.root={root}. Looked for: {', '.join(partial)} "
            f"(MetaOptNet's pickles); train.pickle, val.pickle, test.pickle (RFS's); "
            f"{RELEASE}/ with train, test and meta, or {RELEASE}.tar.gz (the python "
            f"release). Set data.root to the folder that holds one of them."
        )

    def set_splits(self, tables: dict[str, dict[str, list[int]]]) -> None:
        """The splits' classes; a class of the split lists without images (a partial
        release) is left out and reported as a problem (``metacli data check``)."""
        self.splits = {}
        self.problems: list[str] = []
        for split in SPLITS:
            names = [n for n in tables[split] if tables[split][n]]
            self.problems += [
                f"the {split} split's class {n} has no images in {self.root}; it is left out"
                for n in tables[split]
                if not tables[split][n]
            ]
            self.splits[split] = ClassSet.of([list(tables[split][n]) for n in names], names)
            self.problems += uneven(names, [len(tables[split][n]) for n in names])
        warn_problems(self.problems)
        self.check_sizes()
