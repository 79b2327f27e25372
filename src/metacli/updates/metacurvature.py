"""Meta-Curvature (Park & Oliva 2019): meta-learned curvature matrices on the inner gradient.

theta <- theta - alpha * MC(grad), where MC transforms each adapted tensor's gradient with
matrices meta-learned with the initialisation (the tensor-product form of the paper):

- a vector (a bias, a norm's scale or shift): element by element, ``mc * g``;
- a matrix [a, b] (a linear layer's weight): ``M_a @ g @ M_b``;
- a tensor [a, b, k...] (a convolution's weight): one matrix per mode, the kernel's
  positions flattened into one, ``sum M_a[i, x] M_b[y, j] M_k[l, z] g[x, y, z]``.

Every matrix starts at the identity (and ``mc`` at ones), so the rule starts as plain
SGD (MAML's). The same mode products as the authors' code (silverbottlep/maml,
``transform_gradients``; TF's [kh, kw, in, out] there, PyTorch's [out, in, kh, kw] here,
learn2learn's ``MetaCurvatureTransform`` likewise): a transposed convention, so the same
family of transforms. ``algo=maml update=metacurvature`` (any algorithm whose
meta-gradient reaches the rule); deviations in docs/metacurvature.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateRule, slot


def transform(g: Tensor, mats: list[Tensor]) -> Tensor:
    """MC(g) of one tensor: ``mats`` is [mc] for a vector, [M_a, M_b] for a matrix and
    [M_a, M_b, M_k] for a tensor of more dimensions."""
    if g.dim() <= 1:
        return mats[0] * g
    if g.dim() == 2:
        return mats[0] @ g @ mats[1]
    a, b = g.shape[0], g.shape[1]
    modes = g.reshape(a, b, -1)
    out = torch.einsum("ix,xyz,yj,lz->ijl", mats[0], modes, mats[1], mats[2])
    return out.reshape(g.shape)


def identity_for(p: Tensor) -> list[Tensor]:
    """The starting matrices of one tensor (the transform is then the identity)."""
    if p.dim() <= 1:
        return [torch.ones_like(p)]
    sizes = [p.shape[0], p.shape[1]]
    if p.dim() > 2:
        sizes.append(math.prod(p.shape[2:]))
    return [torch.eye(n, dtype=p.dtype, device=p.device) for n in sizes]


class MetaCurvature(UpdateRule, key="metacurvature"):
    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.curvature = nn.ParameterDict()
        for name, p in params.items():
            for i, start in enumerate(identity_for(p.detach())):
                self.curvature[f"{slot(name)}__{i}"] = nn.Parameter(start)
        self.counts = {n: len(identity_for(p.detach())) for n, p in params.items()}

    def matrices(self, name: str) -> list[Tensor]:
        return [self.curvature[f"{slot(name)}__{i}"] for i in range(self.counts[name])]

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        return lr

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        lr = state
        new = {n: p - lr * transform(grads[n], self.matrices(n)) for n, p in params.items()}
        return new, state

    def scalars(self) -> dict[str, float]:
        """How far the curvature has moved from plain SGD: the mean over the matrices of
        ||M - I||_F / ||I||_F (vectors: ||mc - 1|| / ||1||)."""
        moved = []
        for name in self.names:
            for m in self.matrices(name):
                start = torch.ones_like(m) if m.dim() == 1 else torch.eye(len(m)).to(m)
                moved.append(((m.detach() - start).norm() / start.norm()).item())
        return {"curvature_moved": sum(moved) / max(len(moved), 1)}
