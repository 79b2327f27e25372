"""metacli: meta-learning experiments from configs.

The command is ``metacli`` (``metacli --help``); the same from Python (``metacli.api``):
``metacli.train``, ``metacli.test``, ``metacli.load``, ``metacli.compare``, and
``metacli.MetacliError``, the one exception they raise. They are imported on first use
(``importlib``, so that the package itself imports none of its modules): ``import
metacli``, and the command's ``--help``, load neither torch nor Hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Learner", "MetacliError", "compare", "load", "test", "train"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'metacli' has no attribute {name!r}")
    module = "metacli.errors" if name == "MetacliError" else "metacli.api"
    return getattr(importlib.import_module(module), name)
