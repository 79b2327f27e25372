"""metacli: meta-learning experiments from configs.

The command is ``metacli`` (``metacli --help``); the same from Python (``metacli.api``):
``metacli.train``, ``metacli.test``, ``metacli.load``, ``metacli.compare``, and
``metacli.MetacliError``, the one exception they raise. Imported on first use, so that
``import metacli`` (and the command's ``--help``) loads neither torch nor Hydra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Learner", "MetacliError", "compare", "load", "test", "train"]

if TYPE_CHECKING:
    from metacli.api import Learner, compare, load, test, train
    from metacli.errors import MetacliError


def __getattr__(name: str) -> Any:
    if name == "MetacliError":
        from metacli.errors import MetacliError

        return MetacliError
    if name in __all__:
        from metacli import api

        return getattr(api, name)
    raise AttributeError(f"module 'metacli' has no attribute {name!r}")
