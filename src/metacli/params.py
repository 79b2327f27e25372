"""Named tensors: a network's weights as the engine, the update rules and the algorithms
pass them around (``{"body.0.weight": tensor, ...}``), one task's at a time."""

from __future__ import annotations

from torch import Tensor

Params = dict[str, Tensor]
