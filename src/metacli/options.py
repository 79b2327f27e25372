"""The options of the config groups and every default, registered with Hydra's ConfigStore
from the ``Config`` dataclasses: a default is written once, in its dataclass field.

- ``algo``, ``model``, ``task``, ``update``: one node per option (built-in or plug-in,
  ``metacli.registry``) holding the fields of its class's ``Config`` with their defaults.
  An adaptive algorithm's node adds its default update rule's settings; an update rule's
  node lands in ``algo`` (``update=momentum`` then ``algo.momentum=0.5``), where its
  settings live.
- ``metacli_defaults``: the sections besides the components (``seed``, ``train``, ``val``,
  ``test``, ``optim``, ``device``, ...), ``metacli.config.RunConfig``'s defaults. It is the
  first entry of conf/train.yaml's defaults list, so the YAML options of ``optim``,
  ``device`` and ``logger`` and the experiment presets hold only what they set.

``register`` runs before anything composes a config; Hydra hands the store to the
processes of parallel launchers with its own state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metacli.algorithms.adaptive import Adaptive
from metacli.algorithms.base import MetaAlgorithm
from metacli.config import RunConfig, merged_schema
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.registry import GROUPS, available, import_class, lookup
from metacli.tasks.base import TaskDistribution
from metacli.updates.base import UpdateRule

GROUP_BASES: dict[str, type] = {
    "algo": MetaAlgorithm,
    "model": Model,
    "task": TaskDistribution,
    "update": UpdateRule,
}
ROOT = "metacli_defaults"  # the node of the top-level sections (conf/train.yaml)
_registered: set[str] = set()


def plain(value: Any) -> Any:
    """A default as a YAML value (a nested config as its fields)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def defaults_of(schema: type) -> dict[str, Any]:
    """A dataclass's fields and their defaults as plain YAML values (its checks are not
    run: a default may be a placeholder that a preset must replace)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "???"  # OmegaConf's mandatory value
        out[f.name] = plain(value)
    return out


def schema_of(group: str, cls: Any, node: Any) -> type:
    """The settings an option's section takes: its class's ``Config``; an adaptive
    algorithm's with those of the update rule that ``node`` names (its default if none)."""
    schema: type = cls.Config
    if group == "algo" and issubclass(cls, Adaptive):
        default = {f.name: f.default for f in dataclasses.fields(schema)}["update"]
        chosen = str(node.get("update", default)) if node is not None else str(default)
        cls.check_rule(str(node.get("name") if node is not None else cls.key), chosen)
        rule = lookup("update", chosen, UpdateRule)
        rule_schema = rule.schema(node)  # the rule's settings come first
        schema = merged_schema(f"{schema.__name__}With{rule_schema.__name__}", rule_schema, schema)
    return schema


def option_node(group: str, name: str) -> dict[str, Any]:
    """The defaults of one option, as Hydra composes them."""
    cls = lookup(group, name, GROUP_BASES[group])
    if group == "update":
        return {"update": name, **defaults_of(cls.schema(None))}
    node = defaults_of(schema_of(group, cls, None))
    node["name"] = name
    return node


def class_of(group: str, node: Any) -> Any:
    """The class of a composed section: the one its ``_target_`` names (a config file of
    the user's), else the one registered under its ``name`` (``metacli.registry``)."""
    base = GROUP_BASES[group]
    target = node.get("_target_")
    if target is not None:
        where = f"{group}={node.get('name')} (its _target_)"
        return import_class(str(target), group, base, where)
    return lookup(group, str(node.get("name")), base)


def declared_keys(group: str, node: Any) -> set[str]:
    """The keys a composed section may hold: its class's schema."""
    return {f.name for f in dataclasses.fields(schema_of(group, class_of(group, node), node))}


def option_keys(group: str) -> dict[str, set[str]]:
    """The keys of each option of a group that needs no config file."""
    keys = {}
    for name in available(group):
        try:
            keys[name] = set(option_node(group, name))
        except ConfigError:  # a plug-in that does not import: its own error when selected
            keys[name] = set()
    return keys


def register() -> None:
    """Every option and the top-level defaults into Hydra's ConfigStore (once a process)."""
    from hydra.core.config_store import ConfigStore

    if "done" in _registered:
        return
    # Hydra deep-copies its config repository, this store included, for every composition
    # and for every group that --help lists (0.2 s each with metacli's options). The
    # store is only read, through ConfigStore.load, which copies the node it returns: the
    # copies may share it (docs/benchmarks.md, Composition).
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]
    store = ConfigStore.instance()
    store.store(name=ROOT, node=defaults_of(RunConfig), provider="metacli")
    for group in GROUPS:
        for name in available(group):
            try:
                node = option_node(group, name)
            except ConfigError:  # a broken plug-in: selecting it says what is wrong
                node = {"update": name} if group == "update" else {"name": name}
            package = "algo" if group == "update" else group
            store.store(group=group, name=name, node=node, package=package, provider="metacli")
    _registered.add("done")
