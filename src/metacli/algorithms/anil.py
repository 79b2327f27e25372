"""ANIL (Raghu et al. 2020): Almost No Inner Loop.

MAML with ``algo.adapt=head``: only the linear head is adapted in the inner loop; the
body (feature extractor) is meta-learned in the outer loop alone. The meta-gradient
still flows to the body through the adapted head (second order unless ``first_order``).
``algo=maml algo.adapt=head`` is the same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig


@dataclass
class ANILConfig(MAMLConfig):
    name: str = "anil"
    adapt: Any = "head"


class ANIL(MAML, key="anil"):
    Config: ClassVar[type[AlgoConfig]] = ANILConfig
