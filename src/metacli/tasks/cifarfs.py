"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's 100 classes split 64 / 16 / 20 at random.

The split is the authors' (bertinetto/r2d2, ``cifar-fs_splits/{train,val,test}.txt``),
listed below in their files' order. Read from the python release or from the MetaOptNet /
RFS pickles (``metacli.tasks.cifar100`` lists the layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

from metacli.errors import MetacliError
from metacli.tasks.cifar100 import Cifar100Config, Cifar100Task, Release

SPLIT_CLASSES = {
    "train": [
        "train",
        "skyscraper",
        "turtle",
        "raccoon",
        "spider",
        "orange",
        "castle",
        "keyboard",
        "clock",
        "pear",
        "girl",
        "seal",
        "elephant",
        "apple",
        "aquarium_fish",
        "bus",
        "mushroom",
        "possum",
        "squirrel",
        "chair",
        "tank",
        "plate",
        "wolf",
        "road",
        "mouse",
        "boy",
        "shrew",
        "couch",
        "sunflower",
        "tiger",
        "caterpillar",
        "lion",
        "streetcar",
        "lawn_mower",
        "tulip",
        "forest",
        "dolphin",
        "cockroach",
        "bear",
        "porcupine",
        "bee",
        "hamster",
        "lobster",
        "bowl",
        "can",
        "bottle",
        "trout",
        "snake",
        "bridge",
        "pine_tree",
        "skunk",
        "lizard",
        "cup",
        "kangaroo",
        "oak_tree",
        "dinosaur",
        "rabbit",
        "orchid",
        "willow_tree",
        "ray",
        "palm_tree",
        "mountain",
        "house",
        "cloud",
    ],
    "val": [
        "otter",
        "motorcycle",
        "television",
        "lamp",
        "crocodile",
        "shark",
        "butterfly",
        "beaver",
        "beetle",
        "tractor",
        "flatfish",
        "maple_tree",
        "camel",
        "crab",
        "sea",
        "cattle",
    ],
    "test": [
        "baby",
        "bed",
        "bicycle",
        "chimpanzee",
        "fox",
        "leopard",
        "man",
        "pickup_truck",
        "plain",
        "poppy",
        "rocket",
        "rose",
        "snail",
        "sweet_pepper",
        "table",
        "telephone",
        "wardrobe",
        "whale",
        "woman",
        "worm",
    ],
}


@dataclass
class CifarFSConfig(Cifar100Config):
    name: str = "cifarfs"


class CifarFS(Cifar100Task, key="cifarfs"):
    Config = CifarFSConfig
    pickle_prefix = "CIFAR_FS"

    @classmethod
    def split_classes(cls, release: Release) -> dict[str, list[int]]:
        index = {name: i for i, name in enumerate(release.fine_names)}
        for names in SPLIT_CLASSES.values():
            absent = [n for n in names if n not in index]
            if absent:
                raise MetacliError(
                    f"The CIFAR-100 release's meta file does not name the class {absent[0]} "
                    f"of CIFAR-FS's split. Use the original cifar-100-python release."
                )
        return {split: [index[n] for n in names] for split, names in SPLIT_CLASSES.items()}
