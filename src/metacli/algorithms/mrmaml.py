"""MR-MAML (Yin et al. 2020, "Meta-learning without memorization"): MAML whose meta-learned
encoder is kept from storing the tasks, by an information bottleneck on its weights or on
its activations.

The network is an encoder (meta-learned, never adapted) followed by the model (``model=``,
the head phi, adapted in the inner loop as in MAML; the model takes the encoder's
``bottleneck``-dimensional output). Following the authors' notebook
(meta_learning_without_memorization/sinusoid/MR_MAML.ipynb):

- ``variant=weights`` (MR-MAML(W)): the encoder's kernels are Gaussian, q(theta) =
  N(mu, sigma^2) with sigma = scale_floor + softplus(rho) (tfp's mean-field posterior), a
  fresh reparameterised kernel sample at every encoder call (the biases are deterministic);
  the meta-loss adds beta * KL(q(theta) || N(0, I)), summed over every kernel element.
- ``variant=activations`` (MR-MAML(A)): a deterministic encoder outputs mu(x) and
  sigma(x) = softplus(.) of the bottleneck; z = mu + sigma * eps per example; the meta-loss
  adds beta * KL(N(mu, sigma) || N(0, I)) of the query examples, averaged over the
  bottleneck dimensions and the examples (with the notebook's 1e-16 variance floor).

As in the notebook, the support set is re-encoded (a new sample) at every inner step and
the query set once. ``test_encoder=mean`` evaluates with the posterior mean (weights) or
mu (activations) instead of a sample. Deviations from the notebook are listed in
docs/mrmaml.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig, Evaluation, MetaLoss
from metacli.algorithms.maml import MAML, MAMLConfig, TaskLoss
from metacli.config import require
from metacli.engine.inner import last
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution

VARIANTS = ("weights", "activations")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "tanh": torch.tanh}
KL_FLOOR = 1e-16  # the notebook's kl_qp_gaussian adds it to both variances


@dataclass
class MRMAMLConfig(MAMLConfig):
    name: str = "mrmaml"
    variant: str = "weights"  # weights | activations
    beta: float = 5e-5  # weight of the KL term
    encoder: list[int] = field(default_factory=lambda: [100])  # hidden widths
    bottleneck: int = 5  # the encoder's output size, the model's input
    activation: str = "relu"  # the encoder's hidden activation
    init_scale: float = -50.0  # weights: rho ~ N(init_scale, 0.1) (untransformed)
    init_loc_std: float = 0.1  # weights: kernel and bias means ~ N(0, init_loc_std)
    scale_floor: float = 1.1920929e-07  # weights: sigma = floor + softplus(rho) (tfp)
    test_encoder: str = "sample"  # sample | mean, at validation and meta-test

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.variant in VARIANTS, "algo.variant", self.variant, "weights or activations")
        require(self.beta >= 0, "algo.beta", self.beta, "it must be >= 0")
        require(self.bottleneck >= 1, "algo.bottleneck", self.bottleneck, "it must be >= 1")
        require(
            all(h >= 1 for h in self.encoder), "algo.encoder", self.encoder, "widths must be >= 1"
        )
        require(
            self.activation in ACTIVATIONS,
            "algo.activation",
            self.activation,
            f"choose one of {', '.join(ACTIVATIONS)}",
        )
        require(self.scale_floor >= 0, "algo.scale_floor", self.scale_floor, "it must be >= 0")
        require(
            self.test_encoder in ("sample", "mean"),
            "algo.test_encoder",
            self.test_encoder,
            "sample or mean",
        )


class Encoder(nn.Module):
    """The meta-learned encoder, called functionally with its parameters as a dict.

    weights: ``w{i}`` (kernel means), ``rho{i}`` (untransformed scales), ``b{i}``;
    activations: ``w{i}``, ``b{i}`` for the hidden layers, then ``mu_w``, ``mu_b``,
    ``sigma_w``, ``sigma_b``. Linear layers are Keras' Dense defaults (Glorot-uniform
    kernels, zero biases), except the Bayesian means, N(0, init_loc_std) as in tfp.
    """

    param_group = "encoder"

    def __init__(self, cfg: MRMAMLConfig, input_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [input_dim, *cfg.encoder, cfg.bottleneck]
        self.layers = len(widths) - 1
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            if cfg.variant == "weights":
                std = cfg.init_loc_std
                self.register_parameter(f"w{i}", nn.Parameter(std * torch.randn(n_out, n_in)))
                self.register_parameter(f"b{i}", nn.Parameter(std * torch.randn(n_out)))
                rho = cfg.init_scale + 0.1 * torch.randn(n_out, n_in)
                self.register_parameter(f"rho{i}", nn.Parameter(rho))
            elif i < self.layers - 1:
                self.register_parameter(f"w{i}", nn.Parameter(glorot(n_out, n_in)))
                self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(n_out)))
            else:  # the Gaussian bottleneck: a mean and a scale layer
                for head in ("mu", "sigma"):
                    self.register_parameter(f"{head}_w", nn.Parameter(glorot(n_out, n_in)))
                    self.register_parameter(f"{head}_b", nn.Parameter(torch.zeros(n_out)))

    def scale(self, rho: Tensor) -> Tensor:
        return self.cfg.scale_floor + F.softplus(rho)

    def encode(
        self, params: Params, x: Tensor, rng: TaskRandom | None
    ) -> tuple[Tensor, Tensor | None]:
        """Codes z [N, bottleneck] of inputs x [N, ...] and, for ``activations``, the mean
        KL of their Gaussians to N(0, I); ``rng=None`` gives the mean, not a sample."""
        act = ACTIVATIONS[self.cfg.activation]
        h = x.flatten(1)
        if self.cfg.variant == "weights":
            for i in range(self.layers):
                w = params[f"w{i}"]
                if rng is not None:  # one kernel sample per call, shared by the examples
                    w = w + self.scale(params[f"rho{i}"]) * rng.normal(tuple(w.shape), w.dtype)
                h = F.linear(h, w, params[f"b{i}"])
                h = act(h) if i < self.layers - 1 else h
            return h, None
        for i in range(self.layers - 1):
            h = act(F.linear(h, params[f"w{i}"], params[f"b{i}"]))
        mu = F.linear(h, params["mu_w"], params["mu_b"])
        sigma = F.softplus(F.linear(h, params["sigma_w"], params["sigma_b"]))
        z = mu if rng is None else mu + sigma * rng.normal(tuple(mu.shape), mu.dtype)
        return z, gaussian_kl(mu, sigma, KL_FLOOR).mean(-1).mean()

    def weight_kl(self, params: Params) -> Tensor:
        """KL(q(theta) || N(0, I)) summed over every kernel element (weights variant)."""
        total = [
            gaussian_kl(params[f"w{i}"], self.scale(params[f"rho{i}"])).sum()
            for i in range(self.layers)
        ]
        return torch.stack(total).sum()


def glorot(n_out: int, n_in: int) -> Tensor:
    bound = math.sqrt(6.0 / (n_in + n_out))
    return (torch.rand(n_out, n_in) * 2 - 1) * bound


def gaussian_kl(mu: Tensor, sigma: Tensor, floor: float = 0.0) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || N(0, 1)) = (sigma^2 + mu^2 - 1 - log sigma^2) / 2."""
    var = sigma.pow(2) + floor
    return 0.5 * (math.log(1.0 + floor) - torch.log(var) - 1.0 + var / (1.0 + floor) + mu.pow(2))


class MRMAML(MAML, key="mrmaml"):
    Config: ClassVar[type[AlgoConfig]] = MRMAMLConfig
    cfg: MRMAMLConfig
    stochastic = True

    def __init__(self, cfg: MRMAMLConfig, model: Model, task: TaskDistribution) -> None:
        if cfg.inner_batch is not None or cfg.test_inner_batch is not None:
            raise ConfigError(
                "algo=mrmaml re-encodes its whole support set at every inner step, so it "
                "takes no mini-batches: set algo.inner_batch and algo.test_inner_batch to null."
            )
        super().__init__(cfg, model, task)
        self.encoder = Encoder(cfg, math.prod(task.input_shape))

    @classmethod
    def model_input_shape(cls, cfg: Any, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (cfg.bottleneck,)

    def encoder_params(self) -> Params:
        return dict(self.encoder.named_parameters())

    def task_loss(  # type: ignore[override]
        self,
        rng: TaskRandom,
        head: Params,
        enc: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
    ) -> TaskLoss:
        steps = self.steps(rng, head, enc, sx, sy, self.train_steps, self.train_lr, rng)
        adapted = last(steps)
        zq, kl = self.encoder.encode(enc, qx, rng)
        prediction = self.forward_with(adapted.params, zq, adapted.index)
        mse = self.task.loss(prediction, qy)
        metric = self.task.metric(prediction, qy).detach()
        if kl is None or self.cfg.beta == 0:  # weights: the posterior's KL, in meta_loss
            return mse, metric, {"query_loss": mse.detach()}
        loss = mse + self.cfg.beta * kl
        return loss, metric, {"query_loss": mse.detach(), "kl": kl.detach()}

    def steps(
        self,
        rng: TaskRandom,
        head: Params,
        enc: Params,
        sx: Tensor,
        sy: Tensor,
        count: int,
        lr: float,
        draw: TaskRandom | None,
        first_order: bool | None = None,
    ) -> Any:
        """The inner loop on the head; the support set re-encoded at every step."""

        def support(params: Params, step: int) -> Tensor:
            z, _ = self.encoder.encode(enc, sx, draw)
            return self.task.loss(self.forward_with(params, z, step), sy)

        order = self.use_first_order() if first_order is None else first_order
        return self.inner.run(head, support, count, lr, order, rng)

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        enc = self.encoder_params()
        out = self.mean_over_tasks(self.task_loss, batch, self.initial_params(), enc)
        if self.cfg.variant == "activations" or self.cfg.beta == 0:
            return out  # (beta = 0 with a zero scale: the KL is infinite, and not needed)
        kl = self.encoder.weight_kl(enc)
        terms = {**out.terms, "kl": kl.detach()}
        return MetaLoss(out.loss + self.cfg.beta * kl, out.metric, terms)

    def trace_encoded(
        self,
        rng: TaskRandom,
        head: Params,
        enc: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        draw = rng if self.cfg.test_encoder == "sample" else None
        zq, _ = self.encoder.encode(enc, qx, draw)
        steps = self.steps(rng, head, enc, sx, sy, self.test_steps, self.test_lr, draw, True)
        return self.measure(steps, zq, qy)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        head = {name: p.detach() for name, p in self.initial_params().items()}
        enc = {name: p.detach() for name, p in self.encoder_params().items()}
        with torch.no_grad():
            loss, metric, outputs = self.executor.map(
                self.trace_encoded, batch.keys, (head, enc), batch.tensors()
            )
        return Evaluation(loss, metric, outputs if predictions else None)

    def scalars(self) -> dict[str, float]:
        if self.cfg.variant != "weights":
            return super().scalars()
        with torch.no_grad():
            rho = [p.flatten() for n, p in self.encoder.named_parameters() if n.startswith("rho")]
            sigma = self.encoder.scale(torch.cat(rho)).mean().item()
        return {**super().scalars(), "encoder_sigma": sigma}
