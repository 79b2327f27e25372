"""iMAML (Rajeswaran et al. 2019): the meta-gradient of MAML by implicit differentiation.

Each task's inner loop minimises its support loss plus (lambda / 2) ||phi - theta||^2
(``algo.lam``) with the update rule and steps of ``algo.update``, never kept as a graph:
memory does not grow with the steps. At the minimum phi*(theta) the implicit function
theorem gives d phi* / d theta = (I + H / lambda)^-1, H the support loss's Hessian at phi,
so the task's meta-gradient is the solution v of

    ((1 + cg_damping) I + H / (lambda + lam_damping)) v = g,   g = d L_query(phi) / d phi,

found by ``algo.cg_steps`` steps of conjugate gradient on Hessian-vector products (as
aravindr93/imaml_dev's ``matrix_evaluator`` and ``cg_solve``; with both dampings 0 it is
the paper's (I + H / lambda) v = g). ``algo.cg_steps=0`` takes g itself (first order).
Parameters the inner loop leaves alone (``algo.adapt``) get the query gradient plus the
implicit term -H_(w, phi) v / (lambda + lam_damping). Settings and deviations:
docs/imaml.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metacli.algorithms.adaptive import Adaptive, AdaptiveConfig
from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.config import require_at_least, require_steps
from metacli.engine.executor import carrying
from metacli.engine.inner import last
from metacli.models.base import Model
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution

# per task: the meta-gradient, the query loss and metric, the logged terms
TaskGradient = tuple[Params, Tensor, Tensor, dict[str, Tensor]]
# u -> (H u, H_(w, phi) u): the support loss's Hessian times u, for and across the adapted
HessianTimes = Callable[[Params], tuple[Params, Params]]


@dataclass
class IMAMLConfig(AdaptiveConfig):
    name: str = "imaml"
    # imaml_dev's omniglot_implicit_maml.py defaults (16 SGD steps, lambda 1, 5 CG steps,
    # damping 1 and 10 on lambda) but its step 0.01, which diverges on the default task
    # (docs/imaml.md): 0.001
    inner_lr: float = 0.001
    inner_steps: int = 16
    test_inner_steps: int | None = None  # null: the training steps (the code's evaluation)
    lam: float = 1.0  # lambda, the proximal term's weight in the inner problem
    test_lam: float | None = None  # lambda at validation and meta-test; null: lam
    cg_steps: int = 5  # conjugate-gradient steps per task; 0: the query gradient itself
    cg_damping: float = 1.0  # added to the identity: (1 + cg_damping) I
    lam_damping: float = 10.0  # added to lambda where it divides H

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least("algo.lam", self.lam, 0, strict=True)
        require_at_least("algo.test_lam", self.test_lam, 0, null=True)
        require_steps("algo.cg_steps", self.cg_steps, 0)
        require_at_least("algo.cg_damping", self.cg_damping, 0)
        require_at_least("algo.lam_damping", self.lam_damping, 0)


def dot(a: Params, b: Params) -> Tensor:
    return torch.stack([(a[n] * b[n]).sum() for n in a]).sum()


def conjugate_gradient(
    apply: Callable[[Params], Params],
    b: Params,
    steps: int,
) -> tuple[Params, Tensor]:
    """x with apply(x) ~ b after ``steps`` steps of conjugate gradient from 0 (A symmetric
    positive definite), and the relative residual ||b - A x|| / ||b||. Fixed steps and no
    branch on the data, so it runs under vmap; a residual that reaches 0 stops moving x."""
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = dict(b)
    p = dict(b)
    rr = dot(r, r)
    tiny = torch.finfo(rr.dtype).tiny
    for _ in range(steps):
        ap = apply(p)
        curvature = dot(p, ap)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(tiny), torch.zeros_like(rr))
        x = {n: x[n] + alpha * p[n] for n in x}
        r = {n: r[n] - alpha * ap[n] for n in r}
        new_rr = dot(r, r)
        beta = torch.where(rr > 0, new_rr / rr.clamp_min(tiny), torch.zeros_like(rr))
        p = {n: r[n] + beta * p[n] for n in p}
        rr = new_rr
    residual = rr.sqrt() / dot(b, b).sqrt().clamp_min(tiny)
    return x, residual


class IMAML(Adaptive, key="imaml"):
    Config: ClassVar[type[AlgoConfig]] = IMAMLConfig
    cfg: IMAMLConfig
    trains_rule = False  # the implicit gradient reaches theta alone, never a rule's rates
    keeps_graphs = False  # no task holds a graph between its steps

    def __init__(self, cfg: IMAMLConfig, model: Model, task: TaskDistribution) -> None:
        super().__init__(cfg, model, task)
        self.test_proximal = cfg.lam if cfg.test_lam is None else cfg.test_lam

    @classmethod
    def second_order(cls, cfg: AlgoConfig) -> bool:
        return False  # Hessian-vector products at phi, never a graph through the steps

    @classmethod
    def holds_query(cls, cfg: AlgoConfig) -> bool:
        return True

    @property
    def exact_gradient(self) -> bool:
        return False  # exact only at the inner minimum, with CG converged and no damping

    def task_gradient(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> TaskGradient:
        """One task's implicit meta-gradient for every trainable parameter."""
        cfg = self.cfg
        steps = self.adapt(
            params,
            sx,
            sy,
            self.train_steps,
            self.train_lr,
            True,
            rng,
            batch=self.train_batch,
            proximal=cfg.lam,
        )
        adapted = last(steps)
        phi = {n: p.detach() for n, p in adapted.params.items()}
        step = self.query_step(adapted.index)
        fast = self.adapted(phi)
        fixed = {n: p for n, p in phi.items() if n not in fast and n in self.trained}

        derivatives = (
            self.functional_derivatives
            if self.executor.functional_grads
            else self.autograd_derivatives
        )
        g, query_loss, prediction, hessian_times = derivatives(
            phi, fast, fixed, (sx, sy, qx, qy), step, rng
        )
        scale = cfg.lam + cfg.lam_damping
        g_fast = {n: g[n] for n in fast}
        residual = torch.zeros_like(query_loss)
        if cfg.cg_steps == 0:
            v = g_fast
        else:

            def apply(u: Params) -> Params:
                hu = hessian_times(u)[0]
                return {n: (1 + cfg.cg_damping) * u[n] + hu[n] / scale for n in u}

            v, residual = conjugate_gradient(apply, g_fast, cfg.cg_steps)
        grads = dict(v)
        if fixed:
            cross = hessian_times(v)[1]  # H_(w, phi) v
            grads.update({n: g[n] - cross[n] / scale for n in fixed})
        distance = torch.stack([(phi[n] - params[n]).pow(2).sum() for n in fast]).sum()
        terms = {"cg_residual": residual.detach(), "phi_distance": distance.sqrt().detach()}
        metric = self.task.metric(prediction, qy).detach()
        return grads, query_loss.detach(), metric, terms

    def functional_derivatives(
        self,
        phi: Params,
        fast: Params,
        fixed: Params,
        data: tuple[Tensor, Tensor, Tensor, Tensor],
        step: int,
        rng: TaskRandom,
    ) -> tuple[Params, Tensor, Tensor, HessianTimes]:
        """The query loss's gradient for ``fast`` and ``fixed``, the loss, the predictions,
        and u -> (H u, H_(w, phi) u) of the support loss, by ``torch.func`` (under vmap)."""
        sx, sy, qx, qy = data

        def query(weights: Params) -> tuple[Tensor, Tensor]:
            prediction = self.forward_with({**phi, **weights}, qx, step)
            return self.task.loss(prediction, qy), prediction

        g, (loss, prediction) = torch.func.grad_and_value(query, has_aux=True)({**fast, **fixed})

        def support_gradient(a: Params, w: Params) -> Params:
            def inner(a: Params) -> Tensor:
                return self.support_loss({**phi, **w, **a}, sx, sy, step, rng)

            return torch.func.grad(inner)(a)

        return g, loss, prediction, torch.func.vjp(support_gradient, fast, fixed)[1]

    def autograd_derivatives(
        self,
        phi: Params,
        fast: Params,
        fixed: Params,
        data: tuple[Tensor, Tensor, Tensor, Tensor],
        step: int,
        rng: TaskRandom,
    ) -> tuple[Params, Tensor, Tensor, HessianTimes]:
        """The same by plain autograd, one task at a time: the query pass in its
        single-backward form (``once``), the support gradient's graph kept for the
        Hessian-vector products."""
        sx, sy, qx, qy = data
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in {**fast, **fixed}.items()}
            prediction = self.forward_with({**phi, **leaves}, qx, step, once=True)
            loss = self.task.loss(prediction, qy)
            found = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
            g = dict(zip(leaves, found, strict=True))
            support = self.support_loss({**phi, **leaves}, sx, sy, step, rng)
            inputs = [leaves[n] for n in fast]
            first = torch.autograd.grad(support, inputs, create_graph=True)

        def hessian_times(u: Params) -> tuple[Params, Params]:
            with torch.enable_grad():
                found = torch.autograd.grad(
                    first,
                    list(leaves.values()),
                    grad_outputs=[u[n] for n in fast],
                    retain_graph=True,
                    materialize_grads=True,
                )
            by_name = dict(zip(leaves, found, strict=True))
            return {n: by_name[n] for n in fast}, {n: by_name[n] for n in fixed}

        return g, loss.detach(), prediction.detach(), hessian_times

    @property
    def trained(self) -> set[str]:
        """The names of the model's parameters that the outer optimizer trains."""
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        theta = self.initial_params()
        detached = {n: p.detach() for n, p in theta.items()}
        grads, losses, metrics, terms = self.executor.map(
            self.task_gradient, batch.keys, (detached,), batch.tensors()
        )
        names = [n for n in grads if theta[n].requires_grad]
        mean = [grads[n].mean(0) for n in names]
        loss = carrying(losses.mean(), [theta[n] for n in names], mean)
        return MetaLoss(loss, metrics, {k: v.mean() for k, v in terms.items()})
