"""Small fixtures in the exact layouts of the dataset releases (tests/test_datasets.py).

Each writer draws images whose class can be told from their colour (a class's base colour
plus noise), so a short training run can learn them.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from metacli.tasks.cifarfs import SPLIT_CLASSES
from metacli.tasks.fc100 import SPLIT_SUPERCLASSES

FINE_NAMES = sorted(n for names in SPLIT_CLASSES.values() for n in names)  # CIFAR-100's order
COARSE_NAMES = sorted(n for names in SPLIT_SUPERCLASSES.values() for n in names)


def class_images(label: int, count: int, size: int, seed: int) -> np.ndarray:
    """[count, size, size, 3] uint8 images of one class (its colour plus noise)."""
    rng = np.random.default_rng(seed * 1000 + label)
    colour = np.random.default_rng(label).integers(30, 226, size=3)
    noise = rng.integers(-30, 31, size=(count, size, size, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def cifar100_release(root: Path, per_class: int = 6, archive: bool = False) -> Path:
    """``cifar-100-python/{train,test,meta}`` as distributed: Python 2-style pickles
    (protocol 2, byte-string keys), rows of 3072 bytes (R plane, G plane, B plane); the
    first images of each class in ``train``, one in ``test``. Superclass c holds the fine
    classes 5c..5c+4 (a fixture's choice; the release has its own grouping)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    parts: dict[str, dict[bytes, object]] = {}
    for part, (first, last) in {
        "train": (0, per_class - 1),
        "test": (per_class - 1, per_class),
    }.items():
        rows, fine, coarse = [], [], []
        for label in range(100):
            images = class_images(label, per_class, 32, 0)[first:last]
            rows.append(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
            fine += [label] * len(images)
            coarse += [label // 5] * len(images)
        parts[part] = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{part} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": np.concatenate(rows),
        }
    parts["meta"] = {
        b"fine_label_names": [n.encode() for n in FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
    }
    for name, value in parts.items():
        (folder / name).write_bytes(pickle.dumps(value, protocol=2))
    if archive:
        path = root / "cifar-100-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        for name in parts:
            (folder / name).unlink()
        folder.rmdir()
        return path
    return folder


def split_pickles(
    root: Path, prefix: str, splits: dict[str, list[int]], per_class: int = 6
) -> None:
    """MetaOptNet's ``{prefix}_{split}.pickle``: {"data": [N, 32, 32, 3] uint8, "labels":
    [N] fine labels}, written as its Python 2 pickles load (protocol 2)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in splits.items():
        data = np.concatenate([class_images(c, per_class, 32, 0) for c in labels])
        values = [c for c in labels for _ in range(per_class)]
        with open(root / f"{prefix}_{split}.pickle", "wb") as handle:
            pickle.dump({b"data": data, b"labels": values}, handle, protocol=2)


def cv2_png(image: np.ndarray) -> np.ndarray:
    """The bytes ``cv2.imencode('.png', image)`` writes, as the uint8 array it returns: it
    takes the array's channels as B, G, R, so the PNG holds them reversed."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., ::-1].copy()).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


TIERED_CLASSES = {"train": 4, "val": 3, "test": 3}


def tiered_release(root: Path, form: str, per_class: int = 5) -> dict[str, np.ndarray]:
    """tieredImageNet in Ren et al.'s release (``form="png"``: ``{split}_images_png.pkl``, a
    list of cv2-encoded PNGs) or MetaOptNet's / RFS's (``"npz"``: ``{split}_images.npz``),
    with ``{split}_labels.pkl`` (label_specific, label_general and their names). Returns
    each split's images [N, 84, 84, 3] as the release's loaders decode them."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    offset = 0
    for split, classes in TIERED_CLASSES.items():
        labels = [c for c in range(classes) for _ in range(per_class)]
        images = np.concatenate(
            [class_images(offset + c, per_class, 84, 1) for c in range(classes)]
        )
        arrays[split] = images
        if form == "png":
            with open(root / f"{split}_images_png.pkl", "wb") as handle:
                pickle.dump([cv2_png(im) for im in images], handle, protocol=2)
        else:
            np.savez(root / f"{split}_images.npz", images=images)
        label_data = {
            b"label_specific": np.array(labels, dtype=np.int64),
            b"label_general": np.array([c // 2 for c in labels], dtype=np.int64),
            b"label_specific_str": [f"n{offset + c:08d}".encode() for c in range(classes)],
            b"label_general_str": [f"n9{c:07d}".encode() for c in range((classes + 1) // 2)],
        }
        with open(root / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump(label_data, handle, protocol=2)
        offset += classes
    return arrays


def cub_release(root: Path, classes: int = 16, per_class: int = 6) -> Path:
    """``CUB_200_2011/`` as distributed: ``images/<id>.<Name>/<Name>_<n>.jpg``, with
    ``images.txt``, ``classes.txt``, ``image_class_labels.txt`` and ``bounding_boxes.txt``."""
    folder = root / "CUB_200_2011"
    images_txt, classes_txt, labels_txt, boxes_txt = [], [], [], []
    image_id = 0
    for c in range(classes):
        name = f"{c + 1:03d}.Bird_{c}"
        classes_txt.append(f"{c + 1} {name}")
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(class_images(c, per_class, 100, 2)):
            image_id += 1
            relative = f"{name}/Bird_{c}_{i:04d}_{image_id}.jpg"
            Image.fromarray(image).resize((120, 90)).save(folder / "images" / relative, quality=95)
            images_txt.append(f"{image_id} {relative}")
            labels_txt.append(f"{image_id} {c + 1}")
            boxes_txt.append(f"{image_id} 10.0 5.0 80.0 60.0")
    for file, lines in (
        ("images.txt", images_txt),
        ("classes.txt", classes_txt),
        ("image_class_labels.txt", labels_txt),
        ("bounding_boxes.txt", boxes_txt),
    ):
        (folder / file).write_text("\n".join(lines) + "\n")
    return folder


class Evil:
    """A pickle that would create a file if it were run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)
