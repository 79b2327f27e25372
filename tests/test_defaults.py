"""Every default is written once: in a Config dataclass field.

conf/ has no file for the component groups (algo, task, model, update): each option's
node is its class's Config, registered by metacli.options. The YAML options of optim,
device and logger hold only what they change, conf/train.yaml and conf/test.yaml only
which option each group takes and Hydra's settings. The presets (experiment, debug,
hparams_search) set values on purpose: a paper's protocol pins its settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from metacli.config import DeviceConfig, LoggerConfig, OptimConfig, RunConfig
from metacli.options import defaults_of, option_node
from metacli.registry import GROUPS, builtins
from tests.conftest import CONF, compose_config

SCHEMAS = {"optim": OptimConfig, "device": DeviceConfig, "logger": LoggerConfig}


def restated(node: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of ``node`` (nested) whose value is the default's (``name`` selects an
    option: never counted)."""
    found = []
    for key, value in node.items():
        if key == "name" and not prefix:
            continue
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            found += restated(value, default, f"{prefix}{key}.")
        elif value == default and type(value) is type(default):
            found.append(f"{prefix}{key}")
    return found


def test_the_check_finds_a_restated_default() -> None:
    defaults = defaults_of(OptimConfig)
    assert restated({"name": "adam", "lr": 0.001, "betas": [0.9, 0.99]}, defaults) == ["lr"]
    assert restated({"groups": {"model": {"lr": None}}}, defaults) == ["groups.model.lr"]
    assert restated({"lr": 0.01, "momentum": 0.9}, defaults) == []


@pytest.mark.parametrize("group", GROUPS)
def test_component_groups_have_no_config_files(group: str) -> None:
    assert not (CONF / group).exists() or not list((CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_the_yaml_options_hold_only_what_they_change(group: str) -> None:
    defaults = defaults_of(SCHEMAS[group])
    for path in sorted((CONF / group).glob("*.yaml")):
        node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        assert not restated(node, defaults), (path, restated(node, defaults))


@pytest.mark.parametrize("primary", ["train", "test"])
def test_the_primary_configs_set_no_value(primary: str) -> None:
    node = yaml.safe_load((CONF / f"{primary}.yaml").read_text(encoding="utf-8"))
    assert set(node) <= {"defaults", "hydra"}


def test_the_top_level_sections_compose_to_run_configs_defaults() -> None:
    cfg = OmegaConf.to_container(compose_config())
    assert isinstance(cfg, dict)
    for key, default in defaults_of(RunConfig).items():
        if key in ("optim", "device", "logger"):  # their options' names and changes on top
            assert cfg[key]["name"] == default["name"], key
            continue
        assert cfg[key] == default, key


@pytest.mark.parametrize("group", GROUPS)
def test_each_option_composes_to_its_classs_defaults(group: str) -> None:
    for option in builtins(group):
        cfg = compose_config(f"{group}={option}")
        section = "algo" if group == "update" else group
        node = OmegaConf.to_container(cfg[section])
        assert isinstance(node, dict)
        expected = option_node(group, option)
        assert {k: node[k] for k in expected} == expected, (group, option)
