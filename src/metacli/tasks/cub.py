"""CUB-200-2011 (Wah et al. 2011) with the few-shot split of Chen et al. 2019: 200 bird
species, 100 / 50 / 50 classes, 84 x 84.

The split is built exactly as wyharveychen/CloserLookFewShot's
``filelists/CUB/write_CUB_filelist.py`` builds it: the class folders of ``images/`` sorted
by name, the i-th going to meta-train when i % 2 == 0, to validation when i % 4 == 1 and to
meta-test when i % 4 == 3. ``data.root`` is ``CUB_200_2011/`` as distributed (or the folder
holding it): ``images/<class>/<image>.jpg``; ``images.txt`` (``<id> <class>/<image>``), where
present, lists the images, and ``classes.txt`` is checked against the folders;
``bounding_boxes.txt`` (``<id> <x> <y> <width> <height>``) is read when ``task.boxes`` is
true. Images are resized as the code's test transform does (``task.resize: closerlook``:
to 1.15 x size, then the centre size x size; ``squash``: straight to size x size), scaled to
[0, 1] and normalised with the ImageNet channel statistics (``normalize: imagenet``, the
code's ``normalize_param``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metacli.config import require
from metacli.errors import MetacliError
from metacli.tasks.base import ClassificationConfig, TaskConfig
from metacli.tasks.images import (
    IMAGE_SUFFIXES,
    ClassSet,
    ImageClassTask,
    cache_dir,
    cached,
    decode_many,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZES = {"closerlook": 1 / 1.15, "squash": 1.0}  # the share of the resized image kept


@dataclass
class CUBConfig(ClassificationConfig):
    name: str = "cub"
    image_size: int = 84
    resize: str = "closerlook"  # closerlook (1.15 x size, centre crop) | squash
    boxes: bool = False  # crop each image to its bounding box first (bounding_boxes.txt)
    normalize: str = "imagenet"  # imagenet (channel means and stds) | none ([0, 1])

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(
            self.resize in RESIZES,
            "task.resize",
            self.resize,
            f"choose {' or '.join(RESIZES)}",
        )
        require(
            self.normalize in ("imagenet", "none"),
            "task.normalize",
            self.normalize,
            "choose imagenet or none",
        )


def find_root(root: Path) -> Path:
    for place in (root, root / "CUB_200_2011", root / "CUB_200_2011" / "CUB_200_2011"):
        if (place / "images").is_dir():
            return place
    raise MetacliError(
        f"No CUB-200-2011 found in data.root={root}: looked for images/ in it and in "
        f"CUB_200_2011/. Set data.root to the CUB_200_2011 folder as distributed."
    )


def read_lines(path: Path, fields: int) -> dict[str, list[str]]:
    """A CUB metadata file (``<id> <field> ...`` a line) as {id: fields}."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != fields + 1:
            raise MetacliError(
                f"{path}, line {number}, has {len(parts)} fields, not {fields + 1} "
                f"('{line.strip()[:60]}'). Restore the file from the release."
            )
        rows[parts[0]] = parts[1:]
    return rows


def list_images(place: Path, boxes: bool) -> dict[str, list[tuple[Path, Any]]]:
    """{class folder: [(image, box or None)]}, classes sorted by name (as the code)."""
    folders = sorted(p.name for p in (place / "images").iterdir() if p.is_dir())
    if not folders:
        raise MetacliError(f"{place / 'images'} holds no class folders. Check data.root.")
    listing = place / "images.txt"
    box_rows = {}
    if boxes:
        box_file = place / "bounding_boxes.txt"
        if not box_file.is_file():
            raise MetacliError(
                f"task.boxes=true reads {box_file}, which does not exist. Restore it from "
                f"the release, or set task.boxes=false."
            )
        box_rows = read_lines(box_file, 4)
    files: dict[str, list[tuple[Path, Any]]] = {f: [] for f in folders}
    if listing.is_file():
        for image_id, (relative,) in read_lines(listing, 1).items():
            folder = relative.split("/")[0]
            path = place / "images" / relative
            if folder not in files or not path.is_file():
                raise MetacliError(
                    f"{listing} names {relative}, which is not in {place / 'images'}. "
                    f"Restore the image, or the release's images.txt."
                )
            box = None
            if boxes:
                if image_id not in box_rows:
                    raise MetacliError(
                        f"{place / 'bounding_boxes.txt'} has no box for image {image_id} "
                        f"({relative}). Restore the file from the release."
                    )
                box = tuple(float(v) for v in box_rows[image_id])
            files[folder].append((path, box))
    else:
        if boxes:
            raise MetacliError(
                f"task.boxes=true needs {listing} to match images to their boxes. Restore it "
                f"from the release, or set task.boxes=false."
            )
        for folder in folders:  # the code lists a folder's files, skipping hidden ones
            files[folder] = [
                (p, None)
                for p in sorted((place / "images" / folder).iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            ]
    classes_txt = place / "classes.txt"
    if classes_txt.is_file():
        named = sorted(name for (name,) in read_lines(classes_txt, 1).values())
        if named != folders:
            extra = sorted(set(folders) ^ set(named))
            raise MetacliError(
                f"{classes_txt} and the folders of {place / 'images'} differ (first: "
                f"{extra[0] if extra else 'their order'}). Restore the release's images/ "
                f"and classes.txt."
            )
    return files


def closer_look_split(folders: list[str]) -> dict[str, list[str]]:
    """write_CUB_filelist.py's split of the sorted class folders."""
    return {
        "train": [f for i, f in enumerate(folders) if i % 2 == 0],
        "val": [f for i, f in enumerate(folders) if i % 4 == 1],
        "test": [f for i, f in enumerate(folders) if i % 4 == 3],
    }


class CUB(ImageClassTask, key="cub"):
    Config = CUBConfig
    cfg: CUBConfig
    stored_images = 11788

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, CUBConfig)
        return (3, cfg.image_size, cfg.image_size)

    def __init__(
        self, cfg: CUBConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root:
            raise MetacliError(
                "task=cub needs its files: set data.root (or METACLI_DATA) to the "
                "CUB_200_2011 folder."
            )
        self.root = find_root(Path(data_root).expanduser())
        self.layout = "CUB_200_2011" + (" with boxes" if cfg.boxes else "")
        files = list_images(self.root, cfg.boxes)
        stamp = [
            (name, len(items), int(max((p.stat().st_mtime for p, _ in items), default=0)))
            for name, items in files.items()
        ]

        def build() -> dict[str, Any]:
            sources = [(p, str(p), box) for items in files.values() for p, box in items]
            images = decode_many(
                sources, cfg.image_size, 3, "decoding CUB", crop=RESIZES[cfg.resize]
            )
            return {"images": images, "classes": {n: len(items) for n, items in files.items()}}

        key = {
            "root": str(self.root.resolve()),
            "source": stamp,
            "size": cfg.image_size,
            "resize": cfg.resize,
            "boxes": cfg.boxes,
        }
        data = cached(cache_dir(cache_folder), "cub", key, build)
        self.images = data["images"]
        if cfg.normalize == "imagenet":
            self.mean = torch.tensor(MEAN).view(3, 1, 1)
            self.std = torch.tensor(STD).view(3, 1, 1)
        rows, start = {}, 0
        for name, count in data["classes"].items():
            rows[name] = list(range(start, start + count))
            start += count
        # (CUB's species hold different numbers of images: uneven counts are the release's)
        self.problems: list[str] = []
        self.splits = {
            split: ClassSet.of([rows[m] for m in members], members)
            for split, members in closer_look_split(sorted(rows)).items()
        }
        self.check_sizes()
