"""Shared base of the models: a registered nn.Module sized by the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from metacli.registry import Registered


@dataclass
class ModelConfig:
    name: str = ""


class Model(nn.Module, Registered):
    """Algorithms call models through ``torch.func.functional_call`` with per-task weights."""

    registry: ClassVar[dict[str, type]] = {}
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # How a meta-batch is best computed on this model when algo.batching=auto.
    # Batching tasks with vmap wins big for small MLPs; conv nets may differ (measure).
    preferred_batching: ClassVar[str] = "vmap"

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], output_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
