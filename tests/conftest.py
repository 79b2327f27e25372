"""Shared helpers: compose configs with Hydra's compose API, run the CLI in a subprocess."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from metacli.composition import compose

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
# One dataset cache for the whole session (pytest-xdist's workers and the CLI's
# subprocesses inherit it), never ~/.cache; removed by the process that made it.
if "METACLI_CACHE" not in os.environ:
    os.environ["METACLI_CACHE"] = tempfile.mkdtemp(prefix="metacli-cache-")
    atexit.register(shutil.rmtree, os.environ["METACLI_CACHE"], ignore_errors=True)
# Fields of metrics.jsonl that measure time, and so legitimately differ between runs.
TIMING_FIELDS = ("wall_time", "it_per_s")


def compose_config(*overrides: str, name: str = "train") -> DictConfig:
    """The config ``metacli <name> OVERRIDES`` runs (metacli's own composition)."""
    return compose(name, list(overrides))


def run_cli(
    *args: str,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``metacli ARGS`` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, "-m", "metacli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"metacli {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def read_metrics(run_dir: Path, drop_timing: bool = True) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if drop_timing:
        for record in records:
            for key in TIMING_FIELDS:
                record.pop(key, None)
    return records


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


TINY = ("debug=tiny",)


def options(group: str) -> list[str]:
    """The options metacli ships for a config group: the registered components of algo,
    task, model and update (their defaults are their Config dataclasses), the YAML files
    of conf/<group>/ for the others. (Installed plug-ins are options too, not shipped.)"""
    from metacli.registry import GROUPS, builtins

    if group in GROUPS:
        return list(builtins(group))
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def float64() -> Any:
    """Default dtype float64 for the test (reference comparisons at 1e-10)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
