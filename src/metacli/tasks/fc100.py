"""FC100 (Oreshkin et al. 2018, TADAM): CIFAR-100 split by its 20 superclasses, 12 / 4 / 4,
so that meta-test classes share no superclass with the training ones.

The superclasses of each split are TADAM's (ElementAI/TADAM's ``class_split``, by coarse
label: train 1-6, 9, 10, 15, 17-19; val 8, 11, 13, 16; test 0, 7, 12, 14), named below.
A split's classes are the fine classes of its superclasses, in fine-label order. Read from
the python release or from the MetaOptNet / RFS pickles (``metacli.tasks.cifar100``).
"""

from __future__ import annotations

from dataclasses import dataclass

from metacli.errors import MetacliError
from metacli.tasks.cifar100 import Cifar100Config, Cifar100Task, Release

SPLIT_SUPERCLASSES = {
    "train": [
        *("fish", "flowers", "food_containers", "fruit_and_vegetables"),
        *("household_electrical_devices", "household_furniture"),
        *("large_man-made_outdoor_things", "large_natural_outdoor_scenes"),
        *("reptiles", "trees", "vehicles_1", "vehicles_2"),
    ],
    "val": [
        *("large_carnivores", "large_omnivores_and_herbivores"),
        *("non-insect_invertebrates", "small_mammals"),
    ],
    "test": ["aquatic_mammals", "insects", "medium_mammals", "people"],
}


@dataclass
class FC100Config(Cifar100Config):
    name: str = "fc100"


class FC100(Cifar100Task, key="fc100"):
    Config = FC100Config
    pickle_prefix = "FC100"

    @classmethod
    def split_classes(cls, release: Release) -> dict[str, list[int]]:
        index = {name: i for i, name in enumerate(release.coarse_names)}
        superclass_of: dict[int, int] = {}
        for fine, coarse in zip(release.fine, release.coarse, strict=True):
            superclass_of.setdefault(fine, coarse)
        splits = {}
        for split, names in SPLIT_SUPERCLASSES.items():
            absent = [n for n in names if n not in index]
            if absent:
                raise MetacliError(
                    f"The CIFAR-100 release's meta file does not name the superclass "
                    f"{absent[0]} of FC100's split. Use the original cifar-100-python release."
                )
            chosen = {index[n] for n in names}
            splits[split] = sorted(f for f, c in superclass_of.items() if c in chosen)
        return splits
