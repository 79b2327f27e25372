"""A differentiable space of inner-loop optimizers, one drawn for each task.

``algo.update=space`` with ``algo.space: [sgd, momentum, adam]`` (any rules of the engine):
each member keeps its hyperparameters as meta-parameters (``learn_hyperparameters``: a step
size per adapted tensor, the momentum, Adam's betas; ``algo.space_learn_hparams=false``
keeps the settings), and meta-learned logits z over the K members give a categorical
distribution. Per task, before its first inner step, weights w [K] are drawn:

- ``gumbel``: straight-through Gumbel-softmax from the task's own random stream,
  y = softmax((z + G) / temperature), w = onehot(argmax y) - sg(y) + y: one member adapts
  the task (w is one-hot in value), and the query loss's gradient reaches z through y;
- ``expectation``: w = softmax(z / temperature), the probability-weighted update.

Every inner step is then theta <- sum_k w_k * update_k(theta, grad), each member advancing
its own state (velocity, moments). All members are computed for every task, so that the
same tensor program serves a whole meta-batch under ``vmap``; a member that was not drawn
gets no gradient. ``algo.space_test`` says how evaluation picks: like training (null), a
draw (``sample``), the most probable member (``argmax``) or ``expectation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from metacli.config import merged_schema, require
from metacli.errors import ConfigError
from metacli.params import Params
from metacli.registry import lookup
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateConfig, UpdateRule

SAMPLING = ("gumbel", "expectation")
TEST = ("sample", "argmax", "expectation")


@dataclass
class SpaceRuleConfig(UpdateConfig):
    space: list[str] = field(default_factory=lambda: ["sgd", "momentum", "adam"])
    space_sampling: str = "gumbel"  # gumbel (one member per task) | expectation
    space_temperature: float = 1.0  # of the softmax over the members
    space_test: str | None = None  # null: as in training | sample | argmax | expectation
    space_learn_hparams: bool = True  # meta-learn the members' step sizes, momentum, betas

    def __post_init__(self) -> None:
        require(
            len(self.space) >= 1 and len(set(self.space)) == len(self.space),
            "algo.space",
            self.space,
            "list one or more distinct update rules",
        )
        require("space" not in self.space, "algo.space", self.space, "a space cannot hold itself")
        require(
            self.space_sampling in SAMPLING,
            "algo.space_sampling",
            self.space_sampling,
            f"choose one of {', '.join(SAMPLING)}",
        )
        require(
            self.space_temperature > 0,
            "algo.space_temperature",
            self.space_temperature,
            "it must be > 0",
        )
        require(
            self.space_test is None or self.space_test in TEST,
            "algo.space_test",
            self.space_test,
            f"choose null or one of {', '.join(TEST)}",
        )


def member_class(name: str) -> type[UpdateRule]:
    try:
        found: type[UpdateRule] = lookup("update", name, UpdateRule)
    except ConfigError as err:
        raise ConfigError(str(err).replace("algo.update=", "algo.space: ")) from None
    return found


def prefixed(member: str, key: str) -> str:
    """A member's logged name: ``adam_beta1``, ``momentum`` (not ``momentum_momentum``)."""
    return key if key.startswith(member) else f"{member}_{key}"


class SpaceRule(UpdateRule, key="space"):
    Config = SpaceRuleConfig
    stochastic = True  # gumbel draws from the task's stream (harmless otherwise)

    @classmethod
    def schema(cls, node: Any) -> type:
        """The space's settings and its default members' (``update=space`` lists them), so
        theirs are always accepted, with those of any other member named in ``algo.space``."""
        listed = node.get("space") if node is not None else None
        names = [*SpaceRuleConfig().space, *(str(m) for m in listed or [])]
        # "space" itself: SpaceRuleConfig's own check names the problem
        members = [n for n in dict.fromkeys(names) if n != "space"]
        parts = [member_class(m).Config for m in reversed(members)]
        return merged_schema(
            "SpaceWith" + "".join(m.title() for m in members), *parts, SpaceRuleConfig
        )

    def __init__(self, cfg: Any, params: Params, lr: float, steps: int) -> None:
        super().__init__(cfg, params, lr, steps)
        self.members = nn.ModuleDict()
        for name in cfg.space:
            member = member_class(name)(cfg, params, lr, steps)
            if cfg.space_learn_hparams:
                member.learn_hyperparameters(lr)
            self.members[name] = member
        self.needs_loss = any(m.needs_loss for m in self.rules().values())
        gumbel = cfg.space_sampling == "gumbel"  # straight-through: an estimate
        self.exact = not gumbel and all(m.exact for m in self.rules().values())
        self.logits = nn.Parameter(torch.zeros(len(cfg.space)))

    def rules(self) -> dict[str, UpdateRule]:
        """The members by name, in the order of ``algo.space``."""
        return {name: cast(UpdateRule, member) for name, member in self.members.items()}

    def probabilities(self) -> Tensor:
        """The distribution over the members [K] (at the temperature)."""
        return torch.softmax(self.logits / self.cfg.space_temperature, 0)

    def weights(self, rng: TaskRandom) -> Tensor:
        """This task's weights over the members [K] (see the module's docstring)."""
        mode = self.cfg.space_sampling
        if not self.training and self.cfg.space_test is not None:
            mode = {"sample": "gumbel"}.get(self.cfg.space_test, self.cfg.space_test)
        probabilities = self.probabilities()
        if mode == "expectation":
            return probabilities
        if mode == "gumbel":
            noise = rng.gumbel(tuple(self.logits.shape), self.logits.dtype)
            soft = torch.softmax((self.logits + noise) / self.cfg.space_temperature, 0)
        else:  # argmax: the most probable member
            soft = probabilities
        index = torch.arange(len(soft), device=soft.device)
        hard = (index == soft.argmax()).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly one-hot in value

    def init(self, params: Params, lr: float, rng: TaskRandom) -> Any:
        states = [m.init(params, lr, rng) for m in self.rules().values()]
        return self.weights(rng), states

    def update(
        self, params: Params, grads: Params, loss: Tensor | None, state: Any, step: int
    ) -> tuple[Params, Any]:
        w, states = state
        new: Params = {}
        after = []
        for k, (member, own) in enumerate(zip(self.rules().values(), states, strict=True)):
            proposal, own = member.update(params, grads, loss, own, step)
            after.append(own)
            for n, value in proposal.items():
                new[n] = w[k] * value if k == 0 else new[n] + w[k] * value
        return new, (w, after)

    def terms(self, state: Any) -> dict[str, Tensor]:
        """Which member adapted the task (1 or 0; the fraction of tasks, averaged over the
        meta-batch) or its weight, and the members' own terms."""
        w, states = state
        out = {f"space_chose_{name}": w[k].detach() for k, name in enumerate(self.members)}
        for (name, member), own in zip(self.rules().items(), states, strict=True):
            out.update({prefixed(name, k): v for k, v in member.terms(own).items()})
        return out

    def rates(self) -> dict[str, Tensor]:
        return {
            f"{name}/{n}": rate
            for name, member in self.rules().items()
            for n, rate in member.rates().items()
        }

    def scalars(self) -> dict[str, float]:
        """The distribution over the members and each member's learned hyperparameters."""
        p = self.probabilities().detach()
        out = {f"space_p_{name}": p[k].item() for k, name in enumerate(self.members)}
        for name, member in self.rules().items():
            out.update({prefixed(name, k): v for k, v in member.scalars().items()})
        return out
