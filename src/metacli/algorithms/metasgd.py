"""Meta-SGD (Li et al. 2017): a meta-learned learning rate for every parameter element.

MAML with the update rule ``metasgd`` (``metacli/updates/metasgd.py``): the inner update
is ``theta - alpha * grad`` with ``alpha`` shaped like ``theta``, initialised to
``algo.inner_lr`` and trained by the outer optimizer with the initialisation (in its own
parameter group, without weight decay unless ``optim.groups.update.weight_decay`` says
so). ``algo=maml algo.update=metasgd`` is the same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig


@dataclass
class MetaSGDConfig(MAMLConfig):
    name: str = "metasgd"
    update: str = "metasgd"
    test_inner_steps: int | None = 1  # one step in training and test (Li et al. 2017)


class MetaSGD(MAML, key="metasgd"):
    Config: ClassVar[type[AlgoConfig]] = MetaSGDConfig
