"""Name -> class for the component groups, and where each option of a group comes from.

An option of ``algo``, ``model``, ``task`` or ``update`` is one of:

- **built-in**: a module of the group's package that registers a class under its own name,
  ``class MAML(Adaptive, key="maml")`` in ``metacli/algorithms/maml.py``;
- **a plug-in**: an entry point of an installed distribution in the group
  ``metacli.<group>`` (``myalgo = "mypkg.algos:MyAlgo"``), named by the entry point;
- **a config file**: a YAML in a config folder of the user's (``--config-dir``) whose
  ``_target_`` is a class's import path, named after the file (``build`` reads the path
  from the composed config; ``import_class`` imports it). An update rule's settings land
  in ``algo``, so its file names the class in ``update:`` instead.

Lookup imports only what the option needs. The options of a group listed by ``--help``
are the built-ins and the plug-ins (``metacli.options`` gives each its defaults).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, ClassVar

from metacli.errors import ConfigError

PACKAGES = {
    "algo": "metacli.algorithms",
    "task": "metacli.tasks",
    "model": "metacli.models",
    "update": "metacli.updates",
}
GROUPS = tuple(PACKAGES)
SETTINGS = {"algo": "algo", "task": "task", "model": "model", "update": "algo.update"}
# What each group's classes subclass, as a user reads it in an error.
BASES = {
    "algo": "metacli.algorithms.base.MetaAlgorithm (or a built-in algorithm: MAML, ...)",
    "model": "metacli.models.base.Model (or a built-in model: MLP, Conv4, ...)",
    "task": "metacli.tasks.base.TaskDistribution (or a built-in task distribution)",
    "update": "metacli.updates.base.UpdateRule (or a built-in update rule: SGDRule, ...)",
}


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


@functools.cache
def builtins(group: str) -> tuple[str, ...]:
    """The built-in options: the modules of the group's package that register a class as
    themselves (helper modules such as ``base`` or ``tasks/images`` are not options)."""
    package = importlib.import_module(PACKAGES[group])
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return tuple(sorted(name for name in names if _registers_itself(PACKAGES[group], name)))


@functools.cache
def plugins(group: str) -> dict[str, str]:
    """Installed plug-ins: entry point name -> ``module:Class`` (group ``metacli.<group>``);
    read once a process (reading them scans every installed distribution)."""
    return {ep.name: ep.value for ep in entry_points(group=f"metacli.{group}")}


def available(group: str) -> list[str]:
    """Every option of a group that needs no config file: built-ins and plug-ins."""
    return sorted({*builtins(group), *plugins(group)})


def is_import_path(name: str) -> bool:
    """``mypkg.rules.MyRule`` or ``mypkg.rules:MyRule``, not an option's name."""
    return ":" in name or "." in name


def import_class(path: str, group: str, base: type, where: str) -> Any:
    """The class at ``path`` (``module.Class`` or ``module:Class``), which must subclass
    ``base``; ``where`` says who named it (a config file's ``_target_``, an entry point), for
    a one-paragraph error naming what to fix."""
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    fix = (
        "Install the package that holds it (pip install -e <its folder>) or put its folder "
        "on PYTHONPATH, or correct the path"
    )
    if not module_name or not attribute:
        raise ConfigError(
            f"{where}: {path!r} is not an import path; write it as module.Class (e.g. "
            f"mypkg.algorithms.MyMAML)."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ConfigError(
                f"{where}: cannot import {path}: there is no module {err.name!r} in this "
                f"Python environment. {fix}."
            ) from None
        raise ConfigError(
            f"{where}: cannot import {path}: {module_name} needs the module {err.name!r}, "
            f"which is not installed. Install it (pip install <its distribution>)."
        ) from None
    found = getattr(module, attribute, None)
    if found is None:
        raise ConfigError(
            f"{where}: module {module_name} has no class {attribute!r}. {fix} (the module's "
            f"file: {getattr(module, '__file__', '?')})."
        )
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ConfigError(
            f"{where}: {path} is not a metacli {group} component: it must be a class that "
            f"subclasses {BASES[group]}."
        )
    return found


def lookup(group: str, name: str, base: type[Registered]) -> Any:
    """The class of the option ``name`` of ``group`` (a built-in, a plug-in or, for update
    rules, an import path); a ConfigError naming the options if there is none.

    A class registered in-process (a test's, a script's) is found without a module.
    """
    setting = SETTINGS[group]
    if is_import_path(name):
        return import_class(name, group, base, f"{setting}={name}")
    plugin = plugins(group).get(name)  # an installed plug-in shadows a built-in's name
    if plugin is not None:
        where = f"{setting}={name} (the entry point {name} = {plugin!r} in metacli.{group})"
        return import_class(plugin, group, base, where)
    found: Any = base.registry.get(name)
    if found is not None and found.key == name:
        return found
    if name.isidentifier():
        try:
            importlib.import_module(f"{PACKAGES[group]}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{PACKAGES[group]}.{name}":
                raise
    found = base.registry.get(name)
    if found is None or found.key != name:
        raise ConfigError(
            f"{setting}={name!r} is not an option (options: {', '.join(available(group))}). "
            f"Choose one with {setting}=<option>, add a config file of your own "
            f"(--config-dir DIR with DIR/{group}/{name}.yaml), or install a plug-in."
        )
    return found
