"""The LSTM meta-learner (Ravi & Larochelle 2017, "Optimization as a model for few-shot
learning"): MAML's structure with a learned optimizer in place of the inner SGD step.

The update rule is ``metalstm`` (metacli/updates/metalstm.py: the learner's parameters are
the cell state of a coordinate-wise LSTM whose initial cell state is the meta-learned
initialisation). As in the paper, the learner's gradient and loss enter the meta-learner
as constants, so the meta-gradient flows through the LSTM's cell path only. The inner loop
walks the support set in mini-batches of ``inner_batch_size`` examples (the authors' 5 for
1-shot, 25 for 5-shot), one update per mini-batch, cycling through the support set for
``inner_steps`` updates in all (12 for 1-shot, 8 for 5-shot in the authors' configs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.config import require
from metacli.params import Params
from metacli.streams import TaskRandom


@dataclass
class MetaLSTMConfig(MAMLConfig):
    name: str = "metalstm"
    update: str = "metalstm"
    # updates per task (the authors' configs: 12 for 1-shot with batch 5, 8 for 5-shot with
    # batch 25; the presets set them)
    inner_steps: int = 5
    test_inner_steps: int | None = None  # null: inner_steps (the LSTM is trained for that many)
    first_order: bool = True  # the gradient and loss inputs are constants (the paper)
    inner_batch_size: int | None = None  # support examples per update (null: all of them)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.inner_batch_size is None or self.inner_batch_size >= 1,
            "algo.inner_batch_size",
            self.inner_batch_size,
            "it must be >= 1 or null",
        )


class MetaLSTM(MAML, key="metalstm"):
    Config: ClassVar[type[AlgoConfig]] = MetaLSTMConfig
    cfg: MetaLSTMConfig
    fixed_update = "metalstm"

    def support_loss(
        self, params: Params, x: Tensor, y: Tensor, step: int, rng: TaskRandom
    ) -> Tensor:
        """The loss of the mini-batch that update ``step`` sees (cycling through x)."""
        size = self.cfg.inner_batch_size
        if size is not None and size < x.shape[0]:
            batches = -(-x.shape[0] // size)
            start = (step % batches) * size
            x, y = x[start : start + size], y[start : start + size]
        return super().support_loss(params, x, y, step, rng)
