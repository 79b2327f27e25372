"""MetaNAS (Elsken et al. 2020, "Meta-learning of neural architectures for few-shot
learning"): meta-learn a DARTS search network's architecture weights alpha together with
its weights w, then derive the architecture.

Both alpha and w are meta-parameters; per task both adapt in the inner loop (the update
rule ``algo.update``: MetaNAS's task optimizer is Adam with beta1 = 0 on w and alpha,
``experiment=metanas_*``) unless ``algo.adapt_alpha=false``; the outer update is Reptile's
(``algo.meta=reptile``, MetaNAS's choice: theta <- theta + eps (phi - theta), with its own
outer rate for alpha through the parameter group ``architecture``) or MAML's, first
(``fomaml``) or second order (``maml``), as T-NAS. During ``algo.warmup_iterations`` outer
steps alpha is frozen (neither adapted nor meta-updated) and only w learns; the softmax
temperature of the edges anneals linearly from ``model.temperature`` to
``algo.temperature_end`` over the training iterations. With ``model.sampling=gumbel`` every
task draws its own discrete architecture from the task's random stream (``Darts.draw``).

Every edge's operation weights are logged as named scalars; ``genotype.json`` (the DARTS
rule: per node the ``model.keep`` strongest edges, each with its best non-zero operation)
and ``genotype.png`` are written to the run folder at each validation and at the end; the
found network trains from scratch with ``model=genotype model.genotype=<run folder>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacli.algorithms.adaptive import minibatches
from metacli.algorithms.base import AlgoConfig, Evaluation, MetaLoss
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.algorithms.reptile import reptile_loss
from metacli.config import require
from metacli.engine.inner import Step
from metacli.errors import ConfigError
from metacli.figures import genotype_figure
from metacli.models.base import Model
from metacli.models.darts import KINDS, Darts
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution

META = ("reptile", "fomaml", "maml")
PRUNED = -1e9  # the code's logit of a pruned operation


@dataclass
class MetaNASConfig(MAMLConfig):
    name: str = "metanas"
    inner_steps: int = 5
    test_inner_steps: int | None = None  # null: inner_steps
    meta: str = "reptile"  # the meta-learner: reptile (MetaNAS) | fomaml | maml (T-NAS)
    adapt_alpha: bool = True  # the architecture weights adapt in the inner loop too
    warmup_iterations: int = 0  # outer steps in which only the weights w learn
    temperature_end: float | None = None  # anneal model.temperature to this (null: keep it)
    temperature_schedule: str = "run"  # run: over meta-training | task: over each inner loop
    task_genotypes: bool = False  # T-NAS: each evaluation task's genotype from its adapted alpha
    anneal_iterations: int | None = None  # over this many outer steps (null: train.iterations)
    # MetaNAS's --meta_model_prune_threshold: every meta_prune_every outer steps (null:
    # train.val_every, the code's eval_freq) the meta-learned alphas whose weight at the final
    # temperature is below this are set to -1e9, so their operations take no further part
    meta_prune_threshold: float = 0.0
    meta_prune_every: int | None = None
    # MetaNAS's task optimizer (task_optimizer/darts.py): each inner step an alpha step on one
    # batch (its gradient plus alpha_weight_decay x alpha, the code's Adam weight decay), then
    # a weight step on the next batch at the new alpha, its gradient norm clipped to
    # w_grad_clip (null: no clip); false: one step of both together
    alternate: bool = False
    alpha_weight_decay: float = 0.0
    w_grad_clip: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.meta in META, "algo.meta", self.meta, f"choose one of {', '.join(META)}")
        require(
            not self.first_order,
            "algo.first_order",
            self.first_order,
            "algo=metanas takes its meta-learner from algo.meta (fomaml for first order)",
        )
        require(
            self.warmup_iterations >= 0,
            "algo.warmup_iterations",
            self.warmup_iterations,
            "it must be >= 0",
        )
        require(
            self.temperature_schedule in ("run", "task"),
            "algo.temperature_schedule",
            self.temperature_schedule,
            "run (over meta-training) or task (over each inner loop, as MetaNAS's code)",
        )
        require(
            0.0 <= self.meta_prune_threshold < 1.0,
            "algo.meta_prune_threshold",
            self.meta_prune_threshold,
            "a weight in [0, 1)",
        )
        require(
            self.alpha_weight_decay >= 0,
            "algo.alpha_weight_decay",
            self.alpha_weight_decay,
            "it must be >= 0",
        )
        require(
            self.w_grad_clip is None or self.w_grad_clip > 0,
            "algo.w_grad_clip",
            self.w_grad_clip,
            "it must be > 0 or null",
        )
        require(
            self.meta_prune_every is None or self.meta_prune_every >= 1,
            "algo.meta_prune_every",
            self.meta_prune_every,
            "it must be >= 1 or null",
        )
        require(
            self.temperature_end is None or self.temperature_end > 0,
            "algo.temperature_end",
            self.temperature_end,
            "it must be > 0 or null",
        )


class MetaNAS(MAML, key="metanas"):
    Config: ClassVar[type[AlgoConfig]] = MetaNASConfig
    cfg: MetaNASConfig
    model: Darts

    def __init__(self, cfg: MetaNASConfig, model: Model, task: TaskDistribution) -> None:
        if not isinstance(model, Darts):
            raise ConfigError(
                f"algo=metanas searches an architecture, so it needs model=darts (the search "
                f"network), not model={model.cfg.name}. Train a found architecture with "
                f"model=genotype and any other algorithm."
            )
        super().__init__(cfg, model, task)
        self.start_temperature = float(model.temperature)
        self.executor.stochastic |= model.cfg.drop_path > 0  # each task's own masks

    # --- what the meta-learner is -------------------------------------------------------
    @classmethod
    def second_order(cls, cfg: AlgoConfig) -> bool:
        return isinstance(cfg, MetaNASConfig) and cfg.meta == "maml"

    @classmethod
    def holds_query(cls, cfg: AlgoConfig) -> bool:
        return isinstance(cfg, MetaNASConfig) and cfg.meta != "reptile"

    def use_first_order(self) -> bool:
        return self.cfg.meta != "maml"

    @property
    def exact_gradient(self) -> bool:
        gumbel = self.model.stochastic  # a straight-through estimate
        return self.cfg.meta == "maml" and not gumbel and self.rule.exact

    def adapted_names(self) -> list[str]:
        names = super().adapted_names()
        if self.cfg.adapt_alpha:
            return names
        return [n for n in names if n not in self.model.architecture_names()]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The architecture weights in their own group, ``architecture`` (its own outer
        rate and decay: ``optim.groups.architecture.lr``, ``.weight_decay``)."""
        groups = super().param_groups()
        alphas = [getattr(self.model, n) for n in self.model.architecture_names()]
        ids = {id(a) for a in alphas}
        groups["model"] = [p for p in groups["model"] if id(p) not in ids]
        return {"model": groups["model"], "architecture": alphas, **groups}

    def frozen(self) -> bool:
        return int(self.outer_steps) < self.cfg.warmup_iterations

    # --- per task -------------------------------------------------------------------------
    def forward_with(self, params: Params, x: Tensor, step: int = 0, once: bool = False) -> Tensor:
        frozen = self.frozen()
        if frozen:  # warm-up: alpha is a constant, so it neither adapts nor learns
            params = {**params, **{n: params[n].detach() for n in self.model.architecture_names()}}
        end = self.cfg.temperature_end
        if end is not None and self.cfg.temperature_schedule == "task":
            # MetaNAS's schedule: linear over the phase's inner steps, the query at the end;
            # it stays at the start while alpha is frozen (the authors' warm-up)
            steps = self.train_steps if self.training else self.test_steps
            done = 0.0 if frozen or steps < 2 else min(step, steps - 1) / (steps - 1)
            value = self.start_temperature + (end - self.start_temperature) * done
            params = {**params, "temperature": torch.tensor(value, dtype=x.dtype, device=x.device)}
        return super().forward_with(params, x, step, once)

    def adapt(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        lr: float,
        first_order: bool,
        rng: TaskRandom,
        keep_loss: bool = False,
        batch: int | None = None,
        state: Any = None,
        proximal: float = 0.0,
    ) -> Iterator[Step]:
        if not self.cfg.alternate:
            return super().adapt(
                params, x, y, steps, lr, first_order, rng, keep_loss, batch, state, proximal
            )
        return self.alternating(params, x, y, steps, lr, first_order, rng, batch)

    def alternating(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        lr: float,
        first_order: bool,
        rng: TaskRandom,
        batch: int | None,
    ) -> Iterator[Step]:
        """The code's task step, ``steps`` times: alpha on one batch (plus its weight
        decay), then the weights on the next at the new alpha (their gradient's norm
        clipped), each with its own state of the update rule; alpha stays while frozen."""
        if self.model.stochastic:
            params = {**params, **self.model.draw(rng)}
        order = None
        if batch is not None and batch != x.shape[0]:
            order = minibatches(rng, x.shape[0], batch, 2 * steps)  # [2 steps, batch]

        def examples(index: int) -> tuple[Tensor, Tensor]:
            return (x, y) if order is None else (x[order[index]], y[order[index]])

        adapted = list(self.adapted(params))
        architecture = set(self.model.architecture_names())
        alphas = [n for n in adapted if n in architecture and not self.frozen()]
        weights = [n for n in adapted if n not in architecture]
        states = {
            "alpha": self.rule.init({n: params[n] for n in alphas}, lr, rng),
            "w": self.rule.init({n: params[n] for n in weights}, lr, rng),
        }
        yield Step(0, params)
        for step in range(steps):
            value: Tensor | None = None
            for part, names in (("alpha", alphas), ("w", weights)):
                if not names:
                    continue
                fast = {n: params[n] for n in names}
                at, index = params, 2 * step + (part == "w")

                def loss(
                    f: Params, at: Params = at, index: int = index, step: int = step
                ) -> Tensor:
                    return self.support_loss({**at, **f}, *examples(index), step, rng)

                grads, value = self.inner.gradient(loss, fast, first_order, part == "w")
                if part == "alpha" and self.cfg.alpha_weight_decay:
                    decay = self.cfg.alpha_weight_decay
                    grads = {n: g + decay * fast[n] for n, g in grads.items()}
                if part == "w" and self.cfg.w_grad_clip is not None:
                    grads = clipped(grads, self.cfg.w_grad_clip)
                new, states[part] = self.rule.update(fast, grads, value, states[part], step)
                params = {**params, **new}
            yield Step(step + 1, params, value)

    def support_loss(
        self, params: Params, x: Tensor, y: Tensor, step: int, rng: TaskRandom
    ) -> Tensor:
        """The support loss; while meta-training, with drop-path's masks drawn from the
        task's stream for this pass (MetaNAS drops paths as it adapts to training tasks,
        never on the query nor at meta-test)."""
        if self.model.cfg.drop_path > 0 and self.training:
            params = {**params, "drop_keep": self.model.drop_masks(rng, x.shape[0], x.dtype)}
        return super().support_loss(params, x, y, step, rng)

    def evaluate(self, batch: TaskBatch, predictions: bool = False) -> Evaluation:
        """Adapt and measure each task (as every adaptive algorithm), and say which
        architecture it used: the one it drew (``model.sampling=gumbel``: each edge's
        operation), or the genotype of its adapted alpha (``algo.task_genotypes``, T-NAS)."""
        labelled = self.model.stochastic or self.cfg.task_genotypes
        if not labelled:
            return super().evaluate(batch, predictions)
        params = {name: p.detach() for name, p in self.initial_params().items()}
        with torch.no_grad():
            loss, metric, outputs, arch = self.executor.map(
                self.trace_architecture, batch.keys, (params,), batch.tensors()
            )
        labels = [self.describe({k: v[i] for k, v in arch.items()}) for i in range(len(metric))]
        return Evaluation(loss, metric, outputs if predictions else None, labels)

    def trace_architecture(
        self, rng: TaskRandom, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Params]:
        """``trace``, plus the task's final alphas and its draws."""
        final: dict[str, Params] = {}

        def remember(steps: Iterator[Step]) -> Iterator[Step]:
            for step in steps:
                final["params"] = step.params
                yield step

        steps = self.adapt(
            params, sx, sy, self.test_steps, self.test_lr, True, rng, batch=self.test_batch
        )
        loss, metric, outputs = self.measure(remember(steps), qx, qy, sx)
        names = [*self.model.architecture_names(), *self.model.draw_names()]
        return loss, metric, outputs, {n: final["params"][n] for n in names}

    def describe(self, arch: Params) -> str:
        """One task's architecture as text: the drawn operation of every edge, or the
        genotype of its adapted alphas."""
        if self.model.stochastic:
            ops = self.model.cfg.ops
            drawn = {
                kind: [
                    ops[int(k)] for k in (arch[f"alpha_{kind}"] + arch[f"gumbel_{kind}"]).argmax(-1)
                ]
                for kind in KINDS
            }
            return json.dumps(drawn)
        gene = self.model.genotype(arch)
        return json.dumps({kind: gene[kind] for kind in KINDS})

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        if self.cfg.meta == "reptile":
            return reptile_loss(self, batch)
        return super().meta_loss(batch)

    # --- schedules and what is logged -----------------------------------------------------
    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        assert isinstance(cfg, MetaNASConfig)
        notes = []
        run = cfg.temperature_schedule == "run"
        if run and cfg.temperature_end is not None and cfg.anneal_iterations is None:
            cfg.anneal_iterations = max(int(run_cfg.train.iterations), 1)
            notes.append(f"algo.anneal_iterations={cfg.anneal_iterations} (train.iterations)")
        if cfg.meta_prune_threshold > 0 and cfg.meta_prune_every is None:
            cfg.meta_prune_every = max(int(run_cfg.train.val_every), 1)
            notes.append(f"algo.meta_prune_every={cfg.meta_prune_every} (train.val_every)")
        return notes

    def observe(self, batch: TaskBatch) -> None:
        super().observe(batch)
        end = self.cfg.temperature_end
        if end is not None and self.cfg.temperature_schedule == "run":
            done = min(float(self.outer_steps) / (self.cfg.anneal_iterations or 1), 1.0)
            value = self.start_temperature + (end - self.start_temperature) * done
            self.model.temperature.fill_(value)
        every = self.cfg.meta_prune_every
        if self.cfg.meta_prune_threshold > 0 and every and int(self.outer_steps) % every == 0:
            self.prune_alphas()

    @torch.no_grad()
    def prune_alphas(self) -> None:
        """The code's prune_alphas: operation weights (softmax at the final temperature)
        below algo.meta_prune_threshold get the logit -1e9, so they stay out of every later
        task (the model's forward pass drops them; their weight stays 0)."""
        end = self.cfg.temperature_end
        temperature = end if end is not None else float(self.model.temperature)
        for kind in KINDS:
            alpha = getattr(self.model, f"alpha_{kind}")
            weights = torch.softmax(alpha / temperature, dim=-1)
            alpha[weights < self.cfg.meta_prune_threshold] = PRUNED

    def scalars(self) -> dict[str, float]:
        """Every edge's operation weights (``arch_<cell>_n<node>_i<input>_<op>``), the
        temperature, and the update rule's scalars."""
        out = {**super().scalars(), "temperature": float(self.model.temperature)}
        ops, nodes = self.model.cfg.ops, self.model.cfg.nodes
        for kind in KINDS:
            alpha = getattr(self.model, f"alpha_{kind}").detach()
            weights = torch.softmax(alpha / self.model.temperature, -1)
            edge = 0
            for node in range(nodes):
                for j in range(node + 2):
                    for k, op in enumerate(ops):
                        out[f"arch_{kind}_n{node}_i{j}_{op}"] = float(weights[edge, k])
                    edge += 1
        return out

    def artifacts(self) -> dict[str, str | bytes]:
        genotype = self.model.genotype()
        files: dict[str, str | bytes] = {"genotype.json": json.dumps(genotype, indent=1) + "\n"}
        picture = genotype_figure(genotype)
        if picture is not None:
            files["genotype.png"] = picture
        return files


def clipped(grads: Params, max_norm: float) -> Params:
    """The gradient scaled to norm at most ``max_norm`` (``clip_grad_norm_``'s rule, with
    its 1e-6; tensor operations alone, so it runs under vmap)."""
    total = torch.sqrt(sum((g * g).sum() for g in grads.values()))  # type: ignore[arg-type]
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {n: g * factor for n, g in grads.items()}
