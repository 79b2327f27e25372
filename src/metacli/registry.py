"""Name -> class registries for the component groups.

A component registers itself by subclassing its group's base class with a key equal
to its module name: ``class MAML(Adaptive, key="maml")`` in
``metacli/algorithms/maml.py``, selected by ``conf/algo/maml.yaml``. Lookup imports
that one module, so adding an algorithm is one Python file plus one YAML file. The
options of a group are exactly the modules that register a class under their own name;
helper modules (``base.py``, ``tasks/images.py``) are never options.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from metacli.errors import ConfigError

PACKAGES = {
    "algo": "metacli.algorithms",
    "task": "metacli.tasks",
    "model": "metacli.models",
    "update": "metacli.updates",
}
SETTINGS = {"algo": "algo", "task": "task", "model": "model", "update": "algo.update"}


class Registered:
    """Mixin: ``class X(Base, key="x")`` files X in ``Base.registry`` (each base sets its own)."""

    registry: ClassVar[dict[str, type]]
    key: ClassVar[str] = ""

    def __init_subclass__(cls, key: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key is not None:
            cls.key = key
            cls.registry[key] = cls


def _registers_itself(package: str, name: str) -> bool:
    module = importlib.import_module(f"{package}.{name}")
    return any(
        isinstance(value, type)
        and issubclass(value, Registered)
        and value.__dict__.get("key") == name
        for value in vars(module).values()
    )


def available(group: str) -> list[str]:
    """Options of a group: the modules of its package that register a class as themselves."""
    package = importlib.import_module(PACKAGES[group])
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return sorted(name for name in names if _registers_itself(PACKAGES[group], name))


def lookup(group: str, name: str, base: type[Registered]) -> Any:
    """The class registered as ``name`` in ``group``; a ConfigError naming the options if none.

    A class registered in-process (a test's, a script's) is found without a module.
    """
    if name not in base.registry and name.isidentifier():
        try:
            importlib.import_module(f"{PACKAGES[group]}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{PACKAGES[group]}.{name}":
                raise
    found: Any = base.registry.get(name)
    if found is None or found.key != name:
        setting = SETTINGS[group]
        raise ConfigError(
            f"{setting}={name!r} is not an option (options: {', '.join(available(group))}). "
            f"Choose one with {setting}=<option>."
        )
    return found
