"""Omniglot (Lake et al. 2015) from local files, in every layout people have.

Layouts under ``data.root`` (or $METACLI_DATA): the official archives
``images_background.zip`` + ``images_evaluation.zip`` read as they are; the same unzipped
(``images_background/<Alphabet>/character<NN>/<id>_<drawer>.png``); torchvision's
``omniglot-py/images_background/...``. Images are 105x105 one-bit PNGs, resized to
``task.image_size`` with ink = 1 (``task.resize``: LANCZOS, antialiased grey; or NEAREST,
binary, the papers' data), and decoded once into a uint8 cache.

Splits: ``vinyals`` (1,028 / 172 / 423 characters, x4 rotations, from the split files
Prototypical Networks published), ``vinyals_trainval`` (the same, training on train + val
as the ProtoNets paper's reported runs: validation then monitors seen classes),
``random`` (MAML's seeded 1,100 / 100 / 423 characters), ``lake`` (background alphabets
to train, with a seeded validation subset; evaluation alphabets to test). For ``random``
and ``lake`` rotations by multiples of 90 degrees become extra classes:
``task.rotations`` for training, ``task.test_rotations`` for
validation and test; ``vinyals`` names its rotations in its files.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metacli.config import require, require_seed
from metacli.console import track
from metacli.errors import MetacliError
from metacli.tasks.base import SPLITS as TASK_SPLITS
from metacli.tasks.base import ClassificationConfig, TaskConfig
from metacli.tasks.images import (
    RESAMPLING,
    ClassSet,
    ImageClassTask,
    cache_dir,
    cached,
    decode_image,
    uneven,
    warn_problems,
)

SETS = ("images_background", "images_evaluation")
NAME = re.compile(
    r"(?:^|/)(images_background|images_evaluation)/([^/]+)/(character\d+)/"
    r"\d+_(\d+)\.png$"
)
SPLITS = ("vinyals", "vinyals_trainval", "random", "lake")


@dataclass
class OmniglotConfig(ClassificationConfig):
    name: str = "omniglot"
    image_size: int = 28
    # lanczos: antialiased grey; nearest: binary, as MAML's, ProtoNets' and Reptile's data
    # (cbfinn/maml's resize_images.py asks PIL for LANCZOS on the 1-bit PNGs, and PIL
    # resizes 1-bit images with NEAREST)
    resize: str = "lanczos"
    split: str = "vinyals"
    split_dir: str | None = None  # vinyals: folder of {train,val,test}.txt
    rotations: list[int] = field(default_factory=lambda: [0, 90, 180, 270])
    test_rotations: list[int] = field(default_factory=lambda: [0])
    random_sizes: list[int] = field(default_factory=lambda: [1100, 100])  # train, val
    lake_val: int = 100  # lake: background characters held out for validation
    split_seed: int = 1  # random, lake: the seed of the class split (not the run's seed)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_seed("task.split_seed", self.split_seed)
        require(self.image_size >= 4, "task.image_size", self.image_size, "it must be >= 4")
        require(self.split in SPLITS, "task.split", self.split, f"choose {', '.join(SPLITS)}")
        require(
            self.resize in RESAMPLING, "task.resize", self.resize, f"choose {', '.join(RESAMPLING)}"
        )
        for key in ("rotations", "test_rotations"):
            angles = getattr(self, key)
            require(
                bool(angles) and all(a in (0, 90, 180, 270) for a in angles),
                f"task.{key}",
                angles,
                "angles from 0, 90, 180, 270",
            )


Reader = Callable[[], bytes]


def find_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """Which layout ``root`` holds, and where its two image sets are."""
    zips = {s: root / f"{s}.zip" for s in SETS}
    if all(p.is_file() for p in zips.values()):
        return "zip", zips
    for layout, base in (("folders", root), ("torchvision", root / "omniglot-py")):
        folders = {s: base / s for s in SETS}
        if all(p.is_dir() for p in folders.values()):
            return layout, folders
    raise MetacliError(
        f"No Omniglot found in data.root={root}. Looked for: {zips['images_background']} and "
        f"{zips['images_evaluation']} (official archives); {root}/images_background/ and "
        f"images_evaluation/ (unzipped); {root}/omniglot-py/images_background/ and "
        f"images_evaluation/ (torchvision). Set data.root to the folder that holds one of them."
    )


def list_images(layout: str, places: dict[str, Path]) -> Iterator[tuple[str, str, Reader]]:
    """(image set, "Alphabet/characterNN", reader) for every image, in a stable order."""
    for image_set, place in places.items():
        if layout == "zip":
            archive = open_zip(place)
            for name in sorted(archive.namelist()):
                match = NAME.search(name)
                if match:
                    yield image_set, f"{place}:{name}", reader(archive, name, place)
        else:
            for path in sorted(place.glob("*/character*/*.png")):
                match = NAME.search(path.as_posix())
                if match:
                    yield image_set, str(path), path.read_bytes


def damaged(path: Path, err: Exception) -> MetacliError:
    return MetacliError(
        f"{path} is not a readable zip archive ({type(err).__name__}: {err}); it is truncated "
        f"or damaged. Replace it with a complete copy (data.root={path.parent})."
    )


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise damaged(path, err) from None


def reader(archive: zipfile.ZipFile, name: str, path: Path) -> Reader:
    def read() -> bytes:
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise damaged(path, err) from None

    return read


def character_of(place: str) -> str:
    """ "Alphabet/characterNN" of an image's path (or "archive.zip:member")."""
    match = NAME.search(place.rsplit(":", 1)[-1])
    assert match is not None  # list_images yields matching names only
    return f"{match[2]}/{match[3]}"


def decode(data: bytes, size: int, name: str, resample: str = "lanczos") -> torch.Tensor:
    """PNG bytes -> uint8 [1, size, size] with ink = 255 (background 0)."""
    return 255 - decode_image(data, size, 1, name, resample=resample)


def load(root: Path, size: int, cache: Path, resample: str = "lanczos") -> dict[str, object]:
    """Decoded images [N, 1, size, size] uint8, and per character its set and image indices."""
    layout, places = find_layout(root)
    stamp = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p in places.values()]

    def build() -> dict[str, object]:
        characters: dict[str, list[int]] = {}
        sets: dict[str, str] = {}
        images: list[torch.Tensor] = []
        for image_set, place, read in track(list(list_images(layout, places)), "decoding Omniglot"):
            character = character_of(place)
            characters.setdefault(character, []).append(len(images))
            sets[character] = image_set
            images.append(decode(read(), size, place, resample))
        if not images:
            raise MetacliError(
                f"The Omniglot {layout} layout in {root} holds no images named "
                f"<set>/<Alphabet>/character<NN>/<id>_<drawer>.png."
            )
        return {
            "images": torch.stack(images),
            "characters": list(characters),
            "indices": [characters[c] for c in characters],
            "sets": [sets[c] for c in characters],
            "layout": layout,
        }

    key = {"layout": layout, "source": stamp, "size": size}
    if resample != "lanczos":  # the default's key is unchanged: existing caches stay valid
        key["resize"] = resample
    return cached(cache, "omniglot", key, build)


class Omniglot(ImageClassTask, key="omniglot"):
    Config = OmniglotConfig
    cfg: OmniglotConfig
    stored_images = 32460  # 1623 characters, 20 drawings each

    @classmethod
    def shape_of(cls, cfg: TaskConfig) -> tuple[int, ...]:
        assert isinstance(cfg, OmniglotConfig)
        return (1, cfg.image_size, cfg.image_size)

    def __init__(
        self, cfg: OmniglotConfig, data_root: str | None = None, cache_folder: str | None = None
    ) -> None:
        super().__init__(cfg, data_root)
        if not data_root:
            raise MetacliError(
                "task=omniglot needs its files: set data.root (or METACLI_DATA) "
                "to the folder holding images_background.zip and "
                "images_evaluation.zip (or the unzipped folders)."
            )
        self.root = Path(data_root).expanduser()
        data = load(self.root, cfg.image_size, cache_dir(cache_folder), cfg.resize)
        self.layout = str(data["layout"])
        self.images = data["images"]  # type: ignore[assignment]
        self.characters: list[str] = list(data["characters"])  # type: ignore[call-overload]
        self.character_set: list[str] = list(data["sets"])  # type: ignore[call-overload]
        self.class_images: list[list[int]] = [list(i) for i in data["indices"]]  # type: ignore[attr-defined]
        self.problems = uneven(self.characters, [len(i) for i in self.class_images])
        warn_problems(self.problems)
        self.splits = {split: self.class_set(names) for split, names in self.split_names().items()}
        self.check_sizes()

    def class_set(self, names: list[tuple[str, int]]) -> ClassSet:
        position = {c: i for i, c in enumerate(self.characters)}
        rows = [self.class_images[position[c]] for c, _ in names]
        turns = torch.tensor([a // 90 for _, a in names], dtype=torch.long)
        return ClassSet.of(rows, [f"{c}/rot{a:03d}" for c, a in names], turns)

    def split_names(self) -> dict[str, list[tuple[str, int]]]:
        """Each split's classes as ("Alphabet/characterNN", rotation degrees)."""
        cfg = self.cfg
        if cfg.split == "vinyals":
            return self.vinyals()
        if cfg.split == "vinyals_trainval":  # ProtoNets' final runs: train on train + val
            splits = self.vinyals()
            return {**splits, "train": splits["train"] + splits["val"]}
        gen = torch.Generator().manual_seed(cfg.split_seed)
        if cfg.split == "random":
            order = [
                self.characters[i] for i in torch.randperm(len(self.characters), generator=gen)
            ]
            n_train, n_val = cfg.random_sizes
            parts = {
                "train": order[:n_train],
                "val": order[n_train : n_train + n_val],
                "test": order[n_train + n_val :],
            }
        else:  # lake
            background = [
                c
                for c, s in zip(self.characters, self.character_set, strict=True)
                if s == "images_background"
            ]
            order = [background[i] for i in torch.randperm(len(background), generator=gen)]
            parts = {
                "train": order[cfg.lake_val :],
                "val": order[: cfg.lake_val],
                "test": [
                    c
                    for c, s in zip(self.characters, self.character_set, strict=True)
                    if s == "images_evaluation"
                ],
            }
        return {
            split: [
                (c, a)
                for c in chars
                for a in (cfg.rotations if split == "train" else cfg.test_rotations)
            ]
            for split, chars in parts.items()
        }

    def vinyals(self) -> dict[str, list[tuple[str, int]]]:
        if self.cfg.split_dir:
            given = Path(self.cfg.split_dir).expanduser()
            missing = [f"{s}.txt" for s in TASK_SPLITS if not (given / f"{s}.txt").is_file()]
            if missing:
                raise MetacliError(
                    f"task.split_dir={self.cfg.split_dir}: {given} lacks {', '.join(missing)}. "
                    f"Set task.split_dir to the folder of the split files train.txt, val.txt "
                    f"and test.txt, or leave it null for the files beside the data."
                )
        places = [Path(self.cfg.split_dir)] if self.cfg.split_dir else []
        places += [self.root / "splits" / "vinyals", self.root / "vinyals"]
        folder = next((p for p in places if (p / "train.txt").is_file()), None)
        if folder is None:
            raise MetacliError(
                "task.split=vinyals needs the split files train.txt, val.txt and test.txt of "
                "Prototypical Networks; looked in "
                + ", ".join(str(p) for p in places)
                + ". Set task.split_dir to their folder, or use task.split=random or lake."
            )
        known = set(self.characters)
        splits = {}
        for split in TASK_SPLITS:
            names = []
            path = folder / f"{split}.txt"
            for number, line in enumerate(path.read_text().split("\n"), 1):
                line = line.strip()
                if not line:
                    continue
                character, _, rotation = line.rpartition("/")
                if not character or not re.fullmatch(r"rot\d+", rotation):
                    raise MetacliError(
                        f"{path}, line {number}: {line!r} is not a class of the form "
                        f"<alphabet>/<character>/rot<degrees> (e.g. "
                        f"Alphabet_of_the_Magi/character01/rot000). Fix or replace the file."
                    )
                if character not in known:
                    raise MetacliError(
                        f"{folder / f'{split}.txt'} names the class {line}, but "
                        f"{character} is not in the Omniglot files of "
                        f"{self.root}. Check data.root or the split files."
                    )
                names.append((character, int(rotation.removeprefix("rot"))))
            splits[split] = names
        return splits
