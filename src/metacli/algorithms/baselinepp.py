"""Baseline++ (Chen et al. 2019, ICLR; CloserLookFewShot's ``loss_type='dist'``).

Baseline with cosine classifiers, in training and at test: the scores are the cosine
similarities of the features to weight-normalised class vectors, each with a learned
norm, times a fixed scale (2 up to 200 classes, 10 beyond), the code's ``distLinear``.
Everything else is Baseline's (``algorithms/baseline.py``; docs/baseline.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.baseline import Baseline, BaselineConfig


@dataclass
class BaselinePPConfig(BaselineConfig):
    name: str = "baselinepp"


class BaselinePP(Baseline, key="baselinepp"):
    Config: ClassVar[type[AlgoConfig]] = BaselinePPConfig
    cosine = True
