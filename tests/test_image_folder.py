"""A folder of class subfolders as a task distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metacli.errors import MetacliError
from metacli.tasks.image_folder import ImageFolder, ImageFolderConfig


def make(root: Path, classes: int = 10, per_class: int = 5) -> Path:
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            colour = np.full((12, 16, 3), (c * 20 + i) % 256, dtype=np.uint8)
            Image.fromarray(colour).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not a class")
    return root


def config(**kwargs: object) -> ImageFolderConfig:
    defaults: dict[str, object] = {
        "ways": 2,
        "shots": 1,
        "queries": 2,
        "image_size": 8,
        "ratios": [0.6, 0.2, 0.2],
    }
    return ImageFolderConfig(**{**defaults, **kwargs})  # type: ignore[arg-type]


def test_ratio_split_shapes_and_values(tmp_path: Path) -> None:
    task = ImageFolder(config(), str(make(tmp_path / "d")), str(tmp_path / "c"))
    assert {s: len(c) for s, c in task.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert task.images.shape == (50, 3, 8, 8)
    members = [set(c.indices[:, 0].tolist()) for c in task.splits.values()]
    assert not (members[0] & members[1]) and not (members[0] & members[2])
    episode = task.sample(3, "train", torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (3, 2, 3, 8, 8) and episode.query_y.shape == (3, 4)
    assert episode.support_x.min() >= 0 and episode.support_x.max() <= 1
    same = task.sample(3, "train", torch.Generator().manual_seed(0))
    assert torch.equal(episode.query_x, same.query_x)
    grey = ImageFolder(config(channels=1), str(tmp_path / "d"), str(tmp_path / "c"))
    assert grey.images.shape == (50, 1, 8, 8)


def test_class_list_split_and_errors(tmp_path: Path) -> None:
    root = make(tmp_path / "d")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("class00\nclass01\nclass02\n")
    (lists / "val.txt").write_text("class03\nclass04\n")
    (lists / "test.txt").write_text("class05\nclass06\n")
    task = ImageFolder(config(split_dir=str(lists)), str(root), str(tmp_path / "c"))
    assert {s: len(c) for s, c in task.splits.items()} == {"train": 3, "val": 2, "test": 2}
    (lists / "test.txt").write_text("class99\n")
    with pytest.raises(MetacliError, match="class99"):
        ImageFolder(config(split_dir=str(lists)), str(root), str(tmp_path / "c"))
    with pytest.raises(MetacliError, match="not a folder"):
        ImageFolder(config(), str(tmp_path / "none"), str(tmp_path / "c"))
    (root / "class03" / "1.png").write_bytes(b"broken")
    with pytest.raises(MetacliError, match=r"class03/1\.png"):
        ImageFolder(config(), str(root), str(tmp_path / "c2"))
