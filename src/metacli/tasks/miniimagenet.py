"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split (64 / 16 / 20 classes).

Layouts under ``data.root`` (or $METACLI_DATA):
- ``images/`` (flat, ``n0153282900000005.jpg``...) with the Ravi CSVs ``train.csv``,
  ``val.csv``, ``test.csv`` (``filename,label``) beside it, in ``splits/ravi/`` or in
  ``task.split_dir``;
- class folders ``{train,val,test}/<wnid>/*.jpg``;
- the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (``...-validation.pkl``
  accepted) holding ``image_data`` [N, 84, 84, 3] uint8 and ``class_dict``
  {wnid: [indices]}. They are read by a restricted unpickler that admits numpy arrays
  and plain containers only; anything else is refused, never executed.
Images are 84x84x3 (LANCZOS-resized when needed), scaled to [0, 1] and (``normalize:
imagenet``, MAML++'s code) normalised with the ImageNet channel means and standard
deviations; ``normalize: none`` keeps [0, 1], as cbfinn/maml and openai/supervised-reptile.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metacli.config import require
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
    resized,
    uneven,
    warn_problems,
)
from metacli.tasks.pickles import load_pickle, require_keys

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class MiniImageNetConfig(ClassificationConfig):
    name: str = "miniimagenet"
    image_size: int = 84
    split_dir: str | None = None  # folder of the Ravi CSVs (flat layout)
    normalize: str = "imagenet"  # imagenet (channel means and stds) | none ([0, 1])
    # train: the 64 meta-training classes; all: all 100 (Chen et al. 2019's cross-domain
    # protocol, which validates and meta-tests on another dataset: val.task, test.task)
    train_classes: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.train_classes in ("train", "all"),
            "task.train_classes",
            self.train_classes,
            "choose train or all",
        )
        require(
            self.normalize in ("imagenet", "none"),
            "task.normalize",
            self.normalize,
            "choose imagenet or none",
        )


def load_split_pickle(path: Path) -> dict[str, Any]:
    data = load_pickle(path, "mini-ImageNet cache")
    return require_keys(data, ("image_data", "class_dict"), str(path), "mini-ImageNet cache")


def find_layout(root: Path, split_dir: str | None) -> tuple[str, dict[str, Any]]:
    pickles = {}
    for split, names in (("train", ["train"]), ("val", ["val", "validation"]), ("test", ["test"])):
        found = [
            root / f"mini-imagenet-cache-{n}.pkl"
            for n in names
            if (root / f"mini-imagenet-cache-{n}.pkl").is_file()
        ]
        if found:
            pickles[split] = found[0]
    if len(pickles) == 3:
        return "pickle", pickles
    if all((root / s).is_dir() for s in SPLITS):
        return "folders", {s: root / s for s in SPLITS}
    csv_places = [Path(split_dir)] if split_dir else []
    csv_places += [root, root / "splits" / "ravi"]
    if split_dir and not all((Path(split_dir) / f"{s}.csv").is_file() for s in SPLITS):
        raise MetacliError(
            f"task.split_dir={split_dir} does not hold the Ravi split files train.csv, "
            f"val.csv and test.csv. Set task.split_dir to their folder, or leave it null."
        )
    if (root / "images").is_dir():
        for place in csv_places:
            if all((place / f"{s}.csv").is_file() for s in SPLITS):
                return "flat", {s: place / f"{s}.csv" for s in SPLITS}
        raise MetacliError(
            f"{root / 'images'} exists but the Ravi split files train.csv, "
            f"val.csv, test.csv were not found in "
            f"{', '.join(str(p) for p in csv_places)}. Set task.split_dir."
        )
    raise MetacliError(
        f"No mini-ImageNet found in data.root={root}. Looked for: "
        f"mini-imagenet-cache-{{train,val,test}}.pkl (pickle caches); {root}/train/<wnid>/, "
        f"val/, test/ (class folders); {root}/images/ with the Ravi CSVs (flat release). Set "
        f"data.root to the folder that holds one of them."
    )


def read_split(layout: str, place: Any, root: Path, size: int) -> dict[str, Any]:
    """One split as {"images": uint8 [N, 3, size, size], "classes": {wnid: [indices]}}."""
    if layout == "pickle":
        data = load_split_pickle(place)
        array = resized(torch.from_numpy(data["image_data"]).permute(0, 3, 1, 2).contiguous(), size)
        return {"images": array, "classes": {k: list(v) for k, v in data["class_dict"].items()}}
    if layout == "folders":
        files = class_folders(place)
    else:
        files = {}
        with open(place, newline="") as handle:
            for row in csv.DictReader(handle):
                path = root / "images" / row["filename"]
                if not path.is_file():
                    raise MetacliError(
                        f"{place} names {row['filename']}, which is not in "
                        f"{root / 'images'}. Check data.root."
                    )
                files.setdefault(row["label"], []).append(path)
    classes: dict[str, list[int]] = {}
    every: list[Path] = []
    for wnid, paths in files.items():
        classes[wnid] = list(range(len(every), len(every) + len(paths)))
        every += paths
    images = [decode_image(p.read_bytes(), size, 3, str(p)) for p in track(every, "decoding")]
    return {"images": torch.stack(images), "classes": classes}


class MiniImageNet(ImageClassTask, key="miniimagenet"):
    Config = MiniImageNetConfig
    cfg: MiniImageNetConfig
    stored_images = 60000  # 100 classes, 600 images each

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, MiniImageNetConfig)
        return (3, cfg.image_size, cfg.image_size)

    def __init__(
        self, cfg: MiniImageNetConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root:
            raise MetacliError(
                "task=miniimagenet needs its files: set data.root (or "
                "METACLI_DATA) to the mini-ImageNet folder."
            )
        self.root = Path(data_root).expanduser()
        self.layout, places = find_layout(self.root, cfg.split_dir)
        stamp = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in places.values()]

        def build() -> dict[str, Any]:
            parts = {
                s: read_split(self.layout, places[s], self.root, cfg.image_size) for s in SPLITS
            }
            offset, images, tables = 0, [], {}
            for split in SPLITS:
                part = parts[split]
                shifted = {k: [i + offset for i in v] for k, v in part["classes"].items()}
                tables[split] = shifted
                images.append(part["images"])
                offset += len(part["images"])
            return {"images": torch.cat(images), "classes": tables}

        data = cached(
            cache_dir(cache_folder),
            "miniimagenet",
            {"layout": self.layout, "source": stamp, "size": cfg.image_size},
            build,
        )
        self.images = data["images"]
        if cfg.normalize == "imagenet":
            self.mean = torch.tensor(MEAN).view(3, 1, 1)
            self.std = torch.tensor(STD).view(3, 1, 1)
        self.splits = {}
        self.problems: list[str] = []
        for split in SPLITS:
            classes = data["classes"][split]  # wnid -> indices into the images of all splits
            names = list(classes)
            self.splits[split] = ClassSet.of([list(classes[n]) for n in names], names)
            self.problems += uneven(names, [len(classes[n]) for n in names])
        if cfg.train_classes == "all":
            every = [self.splits[s] for s in SPLITS]
            self.splits["train"] = ClassSet.of(
                [
                    [int(i) for i in c.indices[k, : c.counts[k]]]
                    for c in every
                    for k in range(len(c))
                ],
                [n for c in every for n in c.names],
            )
        warn_problems(self.problems)
        self.check_sizes()
