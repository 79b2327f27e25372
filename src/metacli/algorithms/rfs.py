"""RFS, "Rethinking Few-Shot Image Classification" (Tian et al. 2020, ECCV; WangYueFt/rfs).

Training is Baseline's (non-episodic cross-entropy over all training classes; the code's
batch of 64 and its augmentation). At validation and meta-test each task's support and
query features are L2-normalised and a multinomial logistic regression is fitted to the
support set by scikit-learn (``LogisticRegression(C=1, lbfgs, max_iter=1000)``, as the
code's ``meta_test``; an optional extra), one task at a time.

``algo.distill_generations``: the born-again self-distillation of the paper. The run's
``train.iterations`` are split into 1 + G equal generations; at each boundary the network
and classifier trained so far become a frozen teacher, the student is re-initialised,
and the next generation minimises ``algo.distill_ce`` x cross-entropy + ``algo.distill_kd``
x KL(teacher || student) at temperature ``algo.distill_temperature`` (the code's
``-r 0.5 -a 0.5``, T = 4). docs/rfs.md lists the settings and the deviations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacli.algorithms.base import AlgoConfig, MetaLoss
from metacli.algorithms.baseline import Baseline, BaselineConfig, Classifier
from metacli.config import require, require_at_least
from metacli.errors import ConfigError
from metacli.extras import require_extra
from metacli.models.base import Model
from metacli.streams import TaskRandom
from metacli.tasks.base import TaskBatch, TaskDistribution


@dataclass
class RFSConfig(BaselineConfig):
    name: str = "rfs"
    batch_size: int = 64
    c_reg: float = 1.0  # LogisticRegression's C
    max_iter: int = 1000
    distill_generations: int = 0
    distill_ce: float = 0.5  # weight of the cross-entropy (-r)
    distill_kd: float = 0.5  # weight of the distillation term (-a)
    distill_temperature: float = 4.0
    # iterations of each generation (null: train.iterations / (1 + distill_generations))
    generation_iterations: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.c_reg > 0, "algo.c_reg", self.c_reg, "it must be > 0")
        require_at_least("algo.max_iter", self.max_iter, 1)
        require_at_least("algo.distill_generations", self.distill_generations, 0)
        require_at_least("algo.generation_iterations", self.generation_iterations, 1, null=True)
        require(
            self.distill_temperature > 0,
            "algo.distill_temperature",
            self.distill_temperature,
            "it must be > 0",
        )


def normalized(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class RFS(Baseline, key="rfs"):
    Config: ClassVar[type[AlgoConfig]] = RFSConfig
    cfg: RFSConfig
    stochastic = False  # scikit-learn's solver is deterministic (random_state=0)
    teacher: nn.ModuleDict
    generation: Tensor

    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        assert isinstance(cfg, RFSConfig)
        if cfg.distill_generations == 0 or cfg.generation_iterations is not None:
            return []
        length = run_cfg.train.iterations // (1 + cfg.distill_generations)
        if length < 1:
            raise ConfigError(
                f"train.iterations={run_cfg.train.iterations} cannot be split into "
                f"1 + algo.distill_generations={cfg.distill_generations} generations. "
                f"Raise train.iterations or lower algo.distill_generations."
            )
        cfg.generation_iterations = length
        return [f"algo.generation_iterations={length} (train.iterations / generations)"]

    def __init__(self, cfg: RFSConfig, model: Model, task: TaskDistribution) -> None:
        require_extra("sklearn", f"algo={cfg.name}")
        super().__init__(cfg, model, task)
        self.register_buffer("generation", torch.zeros((), dtype=torch.long))
        if cfg.distill_generations:  # the previous generation, frozen (checkpointed with it)
            self.teacher = nn.ModuleDict(
                {"model": copy.deepcopy(model), "classifier": copy.deepcopy(self.classifier)}
            ).requires_grad_(False)

    def training_logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.model(x))

    def meta_loss(self, batch: TaskBatch) -> MetaLoss:
        if int(self.generation) == 0:
            return super().meta_loss(batch)
        cfg = self.cfg
        x, y = batch.support_x[0], batch.support_y[0]
        logits = self.training_logits(x)
        teacher = self.teacher
        with torch.no_grad():
            target = teacher["classifier"](teacher["model"](x))
        t = cfg.distill_temperature
        kd = (
            F.kl_div(
                F.log_softmax(logits / t, -1), F.softmax(target / t, -1), reduction="batchmean"
            )
            * t**2
        )
        ce = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean()
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        return MetaLoss(cfg.distill_ce * ce + cfg.distill_kd * kd, accuracy.detach()[None], terms)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        groups.pop("teacher", None)  # frozen
        return groups

    def observe(self, batch: TaskBatch) -> None:
        super().observe(batch)
        length = self.cfg.generation_iterations
        if not self.cfg.distill_generations or length is None:
            return
        if int(self.outer_steps) % length or int(self.generation) >= self.cfg.distill_generations:
            return
        # a generation ends: it becomes the teacher; the student starts afresh
        self.teacher["model"].load_state_dict(self.model.state_dict())
        self.teacher["classifier"].load_state_dict(self.classifier.state_dict())
        self.generation += 1
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            # a new draw that a resume repeats: seeded by the generation and the weights
            total = sum(float(p.double().abs().sum()) for p in self.model.parameters())
            torch.manual_seed(hash((int(self.generation), round(total, 6))) % 2**62)
            fresh_model = type(self.model)(self.model.cfg, self.input_shape, None)
            fresh_classifier = Classifier(self.feature_dim, self.classes.train_classes(), False)
        device = next(self.model.parameters()).device
        self.model.load_state_dict(fresh_model.to(device).state_dict())
        self.classifier.load_state_dict(fresh_classifier.to(device).state_dict())

    def scalars(self) -> dict[str, float]:
        return {"generation": float(self.generation)} if self.cfg.distill_generations else {}

    # --- evaluation ------------------------------------------------------------------------
    def task_scores(
        self, support: Tensor, support_y: Tensor, query: Tensor, ways: int, rng: list[TaskRandom]
    ) -> Tensor:
        from sklearn.linear_model import LogisticRegression

        support, query = normalized(support), normalized(query)
        out = []
        for s, y, q in zip(
            support.cpu().double(), support_y.cpu(), query.cpu().double(), strict=True
        ):
            if not (torch.isfinite(s).all() and torch.isfinite(q).all()):
                # diverged features: NaN scores (the task is reported as diverged),
                # where scikit-learn would stop the run
                out.append(torch.full((len(q), ways), torch.nan, dtype=torch.float64))
                continue
            clf = LogisticRegression(
                C=self.cfg.c_reg, solver="lbfgs", max_iter=self.cfg.max_iter, random_state=0
            )
            clf.fit(s.numpy(), y.numpy())
            scores = torch.full((len(q), ways), -torch.inf, dtype=torch.float64)
            scores[:, torch.as_tensor(clf.classes_)] = torch.from_numpy(
                clf.predict_log_proba(q.numpy())
            )
            out.append(scores)
        return torch.stack(out).to(support)
