"""The one inner-loop driver: adapt one task's parameters step by step with an update rule.

Meta-training, the multi-step loss, validation/meta-test and the figures all iterate
over the same ``InnerLoop.run``: it yields the starting point, then every step's new
parameters with the support loss and gradients that produced them, and each consumer
takes what it needs (the last step, every step's query loss, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metacli.models.fused import backward_once
from metacli.params import Params
from metacli.streams import TaskRandom
from metacli.updates.base import UpdateRule

# (params, step, names, want_loss) -> (support loss or None, its gradient for names) or None
WrittenGradient = Callable[[Params, int, list[str], bool], tuple[Tensor | None, Params] | None]


@dataclass
class Step:
    """The task's parameters after ``index`` inner steps (0: the initialisation)."""

    index: int
    params: Params  # every parameter, adapted or not
    loss: Tensor | None = None  # the support loss whose gradient made this step (if asked)
    grads: Params | None = None  # that gradient, for the adapted parameters
    state: Any = None  # the update rule's state after this step


def last(steps: Iterable[Step]) -> Step:
    """The final step, holding no reference to the earlier ones."""
    final = None
    for step in steps:
        final = step
    assert final is not None
    return final


class InnerLoop:
    def __init__(
        self,
        rule: UpdateRule,
        adapted: Callable[[Params], Params],
        functional: Callable[[], bool],
    ) -> None:
        """``adapted`` picks the parameters the inner loop updates (ANIL: the head);
        ``functional`` says whether inner gradients must come from ``torch.func`` (under
        ``vmap`` or ``torch.compile``) rather than plain autograd."""
        self.rule = rule
        self.adapted = adapted
        self.functional = functional

    def run(
        self,
        params: Params,
        support_loss: Callable[[Params, int], Tensor],
        steps: int,
        lr: float,
        first_order: bool,
        rng: TaskRandom,
        keep_loss: bool = False,
        state: Any = None,
        written: WrittenGradient | None = None,
    ) -> Iterator[Step]:
        """``steps`` updates of ``params`` on ``support_loss(params, step)``.

        Second order (the default) keeps every step differentiable, so the meta-gradient
        flows through the inner loop; ``first_order`` treats each gradient as a constant.
        Each step's support loss is kept (in ``Step.loss``, and given to the rule) when the
        rule says it needs it or ``keep_loss`` asks: under vmap, returning it from the
        gradient transform costs time. ``state`` starts
        the rule from a carried state instead of a fresh one. ``written(params, step,
        names, want_loss)`` gives the support loss and its gradient from a backward pass
        written out by hand, or None where there is none; autograd then computes them.
        """
        want_loss = keep_loss or self.rule.needs_loss
        if state is None:
            state = self.rule.init(self.adapted(params), lr, rng)
        yield Step(0, params, state=state)
        for step in range(steps):
            fast = self.adapted(params)

            def loss(fast: Params, step: int = step, params: Params = params) -> Tensor:
                return support_loss({**params, **fast}, step)

            by_hand = None if written is None else written(params, step, list(fast), want_loss)
            grads, value = self.gradient(loss, fast, first_order, want_loss, by_hand)
            new, state = self.rule.update(fast, grads, value, state, step)
            params = {**params, **new}
            yield Step(step + 1, params, value, grads, state)

    def gradient(
        self,
        loss: Callable[[Params], Tensor],
        fast: Params,
        first_order: bool,
        want_loss: bool,
        by_hand: tuple[Tensor | None, Params] | None = None,
    ) -> tuple[Params, Tensor | None]:
        """d loss / d fast and (if wanted) the loss; differentiable unless ``first_order``.

        ``by_hand``: (loss, gradient) from a backward pass written out, taken as they are
        (no autograd graph to build and walk: faster). Otherwise, under vmap this must be
        ``torch.func``; in a per-task loop plain autograd is faster (measured:
        docs/benchmarks.md), with identical numbers.
        """
        if by_hand is not None or self.functional():
            value: Tensor | None = None
            if by_hand is not None:
                value, grads = by_hand
            elif want_loss:
                grads, value = torch.func.grad_and_value(loss)(fast)
            else:
                grads = torch.func.grad(loss)(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
                value = None if value is None else value.detach()
            return grads, value
        with torch.enable_grad():  # evaluation runs under no_grad with detached weights
            leaves = {
                n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()
            }
            with backward_once(first_order):  # first order: this graph is walked once
                value = loss(leaves)
            found = torch.autograd.grad(
                value,
                list(leaves.values()),
                create_graph=not first_order,
                materialize_grads=True,
            )
        if not want_loss:
            return dict(zip(leaves, found, strict=True)), None
        return dict(zip(leaves, found, strict=True)), value.detach() if first_order else value
