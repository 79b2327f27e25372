"""First-order MAML (Finn et al. 2017, Sec. 5.2): inner gradients are constants.

The meta-gradient is the query-loss gradient at the adapted parameters, applied to the
initialisation: it drops the Hessian term of MAML, saving its memory and time.
"""

from __future__ import annotations

from dataclasses import dataclass

from metacli.algorithms.adaptive import AdaptiveConfig
from metacli.algorithms.maml import MAML


@dataclass
class FOMAMLConfig(AdaptiveConfig):
    name: str = "fomaml"


class FOMAML(MAML, key="fomaml"):
    Config = FOMAMLConfig

    def use_first_order(self) -> bool:
        return True
