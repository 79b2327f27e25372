"""Penalties on the meta-learned initialisation: L_total = L_meta + lambda * Omega(theta).

``algo.regularizer`` picks Omega for any gradient-based algorithm; it acts on the model's
parameters (the initialisation the inner loop starts from) and never on what an update
rule learns (step sizes), whose scale means something else.

- ``l2``: the sum of squares of every parameter of the initialisation.
- ``path``: the squared l2 path norm of Neyshabur, Salakhutdinov & Srebro (2015, "Path-SGD"):
  the sum over every input-to-output path of the product of its squared weights, a bias
  starting a path of its own. For a network of linear layers it is the network with every
  weight and bias squared, without activations, applied to an all-ones input, summed over
  the outputs; for ReLU networks it is invariant to the rescalings that leave the function
  unchanged, which plain L2 is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacli.models.base import Model
from metacli.params import Params

REGULARIZERS = ("none", "l2", "path")


def l2(params: Params) -> Tensor:
    return torch.stack([p.pow(2).sum() for p in params.values()]).sum()


def penalty(kind: str, model: Model, params: Params) -> Tensor:
    """Omega(theta) of the model with weights ``params``."""
    if kind == "l2":
        return l2(params)
    return model.squared_path_norm(params)
