"""The outer optimizers: torch's Adam and SGD, without their first-call import of dynamo.

torch wraps ``add_param_group``, ``zero_grad``, ``step``, ``state_dict`` and
``load_state_dict`` in decorators that import ``torch._dynamo`` on their first call, so that
``torch.compile`` can trace around them. That import is a large part of the time from the
command to the first iteration of a short run (docs/benchmarks.md, "The sinusoid end to
end") and buys nothing: metacli never compiles the outer step (``algo.compile`` compiles
the task computation). These subclasses call the undecorated functions, so the
numbers, the state dict and what a scheduler sees are torch's own (tested bit for bit in
tests/test_optim.py). Where ``torch._dynamo`` is already imported (a compiled run) or a
compiler traces the step, torch's wrapped methods run instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch.optim import SGD as TorchSGD
from torch.optim import Adam as TorchAdam
from torch.optim import Optimizer

F = TypeVar("F", bound=Callable[..., Any])


def undecorated(fn: F) -> F:
    """The function under torch's ``functools.wraps`` decorators."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


class NoDynamo:
    """Mixin: torch's optimizer methods, bypassing the decorators that import dynamo.

    The decorators do two things besides the import: dynamo's disable (a no-op outside a
    compiler) and, around ``step``, gradients off unless ``differentiable``. The second is
    kept here.
    """

    # The torch optimizer this is mixed into (its methods, wrapped, where dynamo is live).
    _torch: Any

    def add_param_group(self: Any, param_group: dict[str, Any]) -> None:
        method = (
            self._torch.add_param_group
            if dynamo_loaded()
            else undecorated(Optimizer.add_param_group)
        )
        method(self, param_group)

    def zero_grad(self: Any, set_to_none: bool = True) -> None:
        method = self._torch.zero_grad if dynamo_loaded() else undecorated(Optimizer.zero_grad)
        method(self, set_to_none)

    def state_dict(self: Any) -> dict[str, Any]:
        method = self._torch.state_dict if dynamo_loaded() else undecorated(Optimizer.state_dict)
        return cast(dict[str, Any], method(self))

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        wrapped = dynamo_loaded()
        method = self._torch.load_state_dict if wrapped else undecorated(Optimizer.load_state_dict)
        method(self, state_dict)

    def step(self: Any, closure: Any = None) -> Any:
        if dynamo_loaded() and torch.compiler.is_compiling():
            return self._torch.step(self, closure)
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return undecorated(self._torch.step)(self, closure)


class OuterAdam(NoDynamo, TorchAdam):
    """``torch.optim.Adam``, the same numbers and state dict."""

    _torch = TorchAdam


class OuterSGD(NoDynamo, TorchSGD):
    """``torch.optim.SGD``, the same numbers and state dict."""

    _torch = TorchSGD
