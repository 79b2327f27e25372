"""mini-ImageNet from its three common layouts, and the restricted unpickler."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metacli.errors import MetacliError
from metacli.tasks.miniimagenet import MiniImageNet, MiniImageNetConfig

SPLIT_CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
PER_CLASS = 4


def pixels(wnid: str, i: int) -> np.ndarray:
    value = int(wnid[1:]) * 30 + i  # each image one colour, distinct per class and index
    return np.full((84, 84, 3), value % 256, dtype=np.uint8)


def make(root: Path, layout: str) -> Path:
    root.mkdir(parents=True)
    if layout == "pickle":
        for split, classes in SPLIT_CLASSES.items():
            data = np.stack([pixels(w, i) for w in classes for i in range(PER_CLASS)])
            class_dict = {
                w: list(range(k * PER_CLASS, (k + 1) * PER_CLASS)) for k, w in enumerate(classes)
            }
            name = "validation" if split == "val" else split
            with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as handle:
                pickle.dump({"image_data": data, "class_dict": class_dict}, handle)
        return root
    for split, classes in SPLIT_CLASSES.items():
        rows = []
        for w in classes:
            for i in range(PER_CLASS):
                name = f"{w}{i:08d}.png"  # lossless, so layouts compare exactly
                folder = root / (split / Path(w) if layout == "folders" else Path("images"))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels(w, i)).save(folder / name)
                rows.append({"filename": name, "label": w})
        if layout == "flat":
            with open(root / f"{split}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["filename", "label"])
                writer.writeheader()
                writer.writerows(rows)
    return root


def config(**kwargs: object) -> MiniImageNetConfig:
    return MiniImageNetConfig(**{"ways": 2, "shots": 1, "queries": 2, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["flat", "folders", "pickle"])
def test_layouts_read_the_same_images(tmp_path: Path, layout: str) -> None:
    task = MiniImageNet(config(), str(make(tmp_path / layout, layout)), str(tmp_path / "c"))
    assert task.layout == layout
    assert task.images.shape == (7 * PER_CLASS, 3, 84, 84) and task.images.dtype == torch.uint8
    assert {s: len(c) for s, c in task.splits.items()} == {"train": 3, "val": 2, "test": 2}
    episode = task.sample(2, "test", torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (2, 2, 3, 84, 84)
    # Normalised with the ImageNet statistics: a pixel of value v maps to (v/255 - m) / s.
    value = task.images[task.splits["test"].indices[0, 0], 0, 0, 0].item()
    assert abs((value / 255 - 0.485) / 0.229) < 10
    reference = MiniImageNet(config(), str(make(tmp_path / "ref", "folders")), str(tmp_path / "d"))
    assert torch.equal(task.images, reference.images)


@pytest.mark.parametrize("layout", ["flat", "pickle"])
def test_each_split_draws_the_images_of_its_own_classes(tmp_path: Path, layout: str) -> None:
    """Validation and test episodes once drew training images (indices restarted at 0)."""
    task = MiniImageNet(config(), str(make(tmp_path / layout, layout)), str(tmp_path / "c"))
    value = {
        int(wnid[1:]) * 30 + i: wnid
        for c in SPLIT_CLASSES.values()
        for wnid in c
        for i in range(PER_CLASS)
    }
    for split, classes in SPLIT_CLASSES.items():
        seen = {
            value[int(task.images[i, 0, 0, 0])]
            for i in task.splits[split].indices.flatten().tolist()
        }
        assert seen == set(classes), split
    assert [task.splits[s].names for s in SPLIT_CLASSES] == list(SPLIT_CLASSES.values())


def test_unsafe_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    root = make(tmp_path / "p", "pickle")
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    with open(root / "mini-imagenet-cache-test.pkl", "wb") as handle:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, handle)
    with pytest.raises(MetacliError, match="Refused to load"):
        MiniImageNet(config(), str(root), str(tmp_path / "c"))
    assert not marker.exists()


def test_missing_data_and_broken_split_files(tmp_path: Path) -> None:
    with pytest.raises(MetacliError, match="mini-imagenet-cache"):
        MiniImageNet(config(), str(tmp_path / "none"), str(tmp_path / "c"))
    root = make(tmp_path / "flat", "flat")
    (root / "images" / "n0100000000.png").unlink()
    with pytest.raises(MetacliError, match=r"n0100000000\.png"):
        MiniImageNet(config(), str(root), str(tmp_path / "c"))
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").unlink()
    with pytest.raises(MetacliError, match="split_dir"):
        MiniImageNet(config(), str(root), str(tmp_path / "c"))
    with pytest.raises(MetacliError, match="shots"):
        MiniImageNet(config(queries=10), str(make(tmp_path / "ok", "pickle")), str(tmp_path / "c"))


@pytest.mark.parametrize("normalize", ["imagenet", "none"])
def test_normalize_imagenet_or_unit_range(tmp_path: Path, normalize: str) -> None:
    """MAML++'s code normalises with the ImageNet statistics; cbfinn/maml and
    openai/supervised-reptile feed pixels / 255."""
    root = make(tmp_path / "data", "pickle")
    task = MiniImageNet(config(normalize=normalize), str(root), str(tmp_path / "c"))
    episode = task.sample(1, "train", torch.Generator().manual_seed(0))
    raw = episode.support_x[0, 0]  # one image: every pixel one value per channel
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    unit = raw * std.view(3, 1, 1) + mean.view(3, 1, 1) if normalize == "imagenet" else raw
    # the image's value v/255, the same in every channel (the fixture's grey images)
    v = unit[:, 0, 0]
    torch.testing.assert_close(v, v[:1].expand(3), atol=1e-6, rtol=0)
    assert 0 <= float(v[0]) <= 1 and float((v[0] * 255 - (v[0] * 255).round()).abs()) < 1e-4
    if normalize == "none":
        assert float(raw.min()) >= 0 and float(raw.max()) <= 1


def test_normalize_must_be_known() -> None:
    from metacli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task\.normalize"):
        config(normalize="zscore")
