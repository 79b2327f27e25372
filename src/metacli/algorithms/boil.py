"""BOIL (Oh et al. 2021): Body Only update in Inner Loop.

MAML with ``algo.adapt=body``: the inner loop updates the feature extractor and leaves
the linear head as it is (the authors' code: HJ-Yoo/BOIL, ``update_parameters`` with
``classifier_step_size=0``); the outer loop meta-learns both, so the head is learned
only where the query loss reaches it. The defaults are the authors' (``run_4conv.sh``):
one inner step of 0.5 on the body, evaluated with that same step. ``algo=maml
algo.adapt=body`` is the same algorithm; deviations are in docs/boil.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig


@dataclass
class BOILConfig(MAMLConfig):
    name: str = "boil"
    adapt: Any = "body"
    inner_lr: float = 0.5  # the authors' --extractor-step-size
    inner_steps: int = 1
    test_inner_steps: int | None = None  # the training step again (the authors' evaluation)


class BOIL(MAML, key="boil"):
    Config: ClassVar[type[AlgoConfig]] = BOILConfig
