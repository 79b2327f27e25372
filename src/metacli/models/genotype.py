"""The network an architecture search found (``genotype.json``), built to be trained from
scratch by any algorithm: ``metacli train algo=maml model=genotype model.genotype=<run>``.

The same macro structure as the search network (stem, cells, reductions, pooling, head),
each cell with only the kept edges of the genotype, one operation each, with affine batch
norm by default (DARTS's derived networks). The macro settings come from the genotype file
(what was searched) unless set here (MetaNAS's "upscaled" networks: more channels, cells).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from metacli.errors import ConfigError
from metacli.models.base import Model, ModelConfig
from metacli.models.darts import KINDS, macro
from metacli.models.operations import OPS


@dataclass
class GenotypeConfig(ModelConfig):
    name: str = "genotype"
    genotype: str = ""  # a run folder of an architecture search, or its genotype.json
    channels: int | None = None  # null: as searched (from the file)
    cells: int | None = None
    reductions: list[int] | None = None
    stem_multiplier: int | None = None
    stem_stride: int | None = None
    affine: bool = True  # affine batch norm inside the operations


def load_genotype(where: str) -> dict[str, Any]:
    """The genotype of a run folder or a genotype.json file, checked."""
    if not where:
        raise ConfigError(
            "model=genotype needs model.genotype: the run folder of an architecture search "
            "(algo=metanas) or its genotype.json."
        )
    path = Path(where)
    path = path / "genotype.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(
            f"model.genotype={where!r}: no genotype.json there. Point model.genotype at the "
            f"run folder of an architecture search (it writes genotype.json) or at the file."
        )
    try:
        gene = json.loads(path.read_text(encoding="utf-8"))
        for kind in KINDS:
            for node in gene[kind]:
                for op, j in node:
                    if op not in OPS or not 0 <= int(j) < len(gene[kind]) + 2:
                        raise ValueError(f"{op!r} from input {j}")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"model.genotype={where!r}: {path} is not a genotype ({err}). It should hold "
            f"'normal' and 'reduce': per node a list of [operation, input] pairs."
        ) from None
    return gene


class GenotypeNet(Model, key="genotype"):
    inputs = "images"
    Config = GenotypeConfig
    preferred_batching = {"cpu": "threads", "cuda": "vmap"}

    def __init__(self, cfg: GenotypeConfig, input_shape: tuple[int, ...], output_dim: int | None):
        super().__init__(cfg, input_shape, output_dim)
        gene = load_genotype(cfg.genotype)
        settings: dict[str, Any] = {
            "channels": cfg.channels or gene["channels"],
            "cells": cfg.cells or gene["cells"],
            "stem_multiplier": cfg.stem_multiplier or gene["stem_multiplier"],
            "stem_stride": cfg.stem_stride or gene.get("stem_stride", 1),
            "nodes": len(gene["normal"]),
            "ops": [],
            "affine": cfg.affine,
            # (genotypes written before the setting: a plain convolution)
            "conv_3x3": gene.get("conv_3x3", "full"),
        }
        self.genotype = gene
        self.reductions = gene["reductions"] if cfg.reductions is None else cfg.reductions
        spec = SimpleNamespace(**settings)
        genes = {kind: gene[kind] for kind in KINDS}
        self.stem, self.cells, features = macro(spec, input_shape[0], self.reductions, genes)
        self.feature_dim = features
        self.head = nn.Linear(features, output_dim) if output_dim else None

    def carried(self) -> dict[str, str]:
        # `metacli test` and `resume` of this run read it from the run folder
        return {"genotype.json": json.dumps(self.genotype, indent=1) + "\n"}

    def features(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return s1.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features) if self.head is not None else features
