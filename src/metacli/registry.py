"""Name -> class registries for the component groups.

A component registers itself by subclassing its group's base class with a key equal
to its module name: ``class MAML(GradientBasedAlgorithm, key="maml")`` in
``metacli/algorithms/maml.py``, selected by ``conf/algo/maml.yaml``. Lookup imports
that one module, so adding an algorithm is one Python file plus one YAML file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from metacli.errors import ConfigError

PACKAGES = {"algo": "metacli.algorithms", "task": "metacli.tasks", "model": "metacli.models"}


class Registered:
    """Mixin: ``class X(Base, key="x")`` files X in ``Base.registry`` (each base sets its own)."""

    registry: ClassVar[dict[str, type]]
    key: ClassVar[str] = ""

    def __init_subclass__(cls, key: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key is not None:
            cls.key = key
            cls.registry[key] = cls


def available(group: str) -> list[str]:
    """Options of a group: the public modules of its package."""
    package = importlib.import_module(PACKAGES[group])
    return sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and m.name != "base"
    )


def lookup(group: str, name: str, base: type[Registered]) -> type:
    """The class registered as ``name`` in ``group``; a ConfigError naming the options if none."""
    options = available(group)
    if name not in options:
        raise ConfigError(
            f"{group}.name={name!r} matches no module in {PACKAGES[group]} "
            f"(options: {', '.join(options)}). Pick one with {group}=<option>."
        )
    importlib.import_module(f"{PACKAGES[group]}.{name}")
    if name not in base.registry:
        raise ConfigError(f"Module {PACKAGES[group]}.{name} registers no class with key {name!r}.")
    return base.registry[name]
