"""The checks that run before Hydra starts a job, so that no folder is made for nothing.

``precheck`` composes the config the way Hydra will (``metacli.composition``) and checks it
against the schemas: a misspelt key or option, an impossible value, or a resume that would
change what a run is, stops here with one paragraph, before any run folder exists. An
option of the user's that shadows a built-in one (a config file, a plug-in) is said here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from metacli.build import Resolved, resolve
from metacli.checkpoint import NO_CHECKPOINT
from metacli.composition import (
    CARRIED,
    SEARCHPATH,
    compose,
    file_options,
    folders_of,
    gives_one,
    informs,
    job_overrides,
    key_of,
    multirun,
    options_of,
    sampled_sweeps,
    split_flags,
    sweep_jobs,
)
from metacli.config import flatten
from metacli.errors import ConfigError, MetacliError
from metacli.registry import GROUPS, builtins, plugins
from metacli.resources import check_memory

# What a resume may change: how long it trains, how it is meta-tested, where it runs.
RESUMABLE = (
    "train.iterations",
    "train.log_every",
    "train.ckpt_every",
    "test.",
    "val.batch_size",
    "device.",
    "threads",
    "distributed.",
    "logger.",
    "data.root",
    "data.cache_dir",
    "optimized_metric",
    "skip_finished",
    "name",
    "tags",
    "resume",
    "ckpt_path",
)


class NothingToDo(MetacliError):
    """A resume of a finished run that adds nothing: said, and exit 0."""


def check_output_folder(command: str, args: list[str]) -> None:
    """The run (or sweep) folder can be made: else Hydra would stop with a traceback."""
    sweep = multirun(args)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    values = [a.split("=", 1)[1] for a in args if key_of(a) == key]
    value = values[-1].strip("'\"") if values else f"outputs/{'multirun' if sweep else command}"
    fixed = value.split("$", 1)[0]  # up to the first interpolation (${now:...})
    path = Path(fixed or ".")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"{key}={value}: {path} is a file, not a folder. Set {key} to a folder."
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}={value}: {path} is not writable. Set {key} to a folder you can write."
            )
        return
    made: list[Path] = []
    try:
        for folder in reversed([path, *path.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
    except OSError as err:
        raise ConfigError(
            f"{key}={value}: cannot create {folder}: {err.strerror or err}. Set {key} to a "
            f"folder you can write."
        ) from None
    finally:
        for folder in reversed(made):  # a check only: leave nothing behind
            folder.rmdir()


@dataclass
class Checked:
    """A single run's config as the checks composed and resolved it (handed to its job, so
    that the config is resolved once)."""

    cfg: DictConfig
    resolved: Resolved


def shadowing(choices: dict[str, str], folders: list[Path]) -> list[str]:
    """One notice per chosen option of the user's that shadows another of that name."""
    notices = []
    for group in GROUPS:
        option = choices.get(group)
        if not option:
            continue
        files = file_options(group, option, folders)
        plugin = plugins(group).get(option)
        shadowed = [
            *(["the built-in option"] if option in builtins(group) else []),
            *([f"the installed plug-in ({plugin})"] if plugin and files else []),
        ]
        mine = f"{files[0]}" if files else f"the installed plug-in {plugin}" if plugin else None
        if mine and shadowed:
            notices.append(
                f"notice: {group}={option} is {mine}, which shadows {' and '.join(shadowed)} "
                f"of that name. Rename your option to use both."
            )
    return notices


def precheck(command: str, args: list[str]) -> Checked | None:
    """Compose and check the first job's config; a resume must not change the run. A
    single run's checked config is returned for its job."""
    overrides = job_overrides(args)
    if overrides is None:
        check_sampled_sweep(command, args)
        return None
    check_output_folder(command, args)
    cfg = compose(command, overrides, keep_hydra=True)
    check_hydra_settings(command, overrides, args, cfg)
    for notice in shadowing(dict(cfg.hydra.runtime.choices), folders_of(overrides)):
        print(f"metacli {command}: {notice}", file=sys.stderr)
    with open_dict(cfg):
        del cfg["hydra"]  # (the config as the job gets it)
    if multirun(args):
        check_sweep(command, args, cfg)
        return None
    resume = cfg.get("resume") if command == "train" else None
    resolved = resolve(cfg)
    check_new_run(resolved, command, bool(resume))
    if command == "test" and not cfg.get("ckpt_path"):
        if cfg.get("resume"):
            raise ConfigError(
                f"resume= continues a training run (metacli train resume=...); metacli test "
                f"meta-tests a checkpoint: metacli test ckpt_path={cfg.resume}/checkpoints/"
                f"best.pt (or last.pt)."
            )
        raise ConfigError(NO_CHECKPOINT)
    if resume:
        check_resume(Path(str(resume)), resolved.effective)
    return Checked(cfg, resolved)


def check_hydra_settings(
    command: str, overrides: list[str], args: list[str], before: DictConfig
) -> None:
    """Hydra's own settings (``hydra.*``, ``hydra/launcher=...``), which the job's config
    (``before``, with Hydra's node) leaves out, composed once with it: a mistake there is
    Hydra's error (exit 1) after the checks, or its traceback."""
    given = [
        a
        for a in split_flags(args)[1]
        if "=" in a and key_of(a).startswith("hydra") and key_of(a) != SEARCHPATH
    ]
    if not given:
        return
    plain = OverridesParser.create()
    for arg in given:
        if "/" in key_of(arg) or not gives_one(arg):
            continue
        node = OmegaConf.select(before, key_of(arg), default=None)
        value = plain.parse_override(arg).value()
        if isinstance(node, DictConfig) and not isinstance(value, dict):
            group = key_of(arg).replace(".", "/")
            options = options_of(group, [])
            choose = (
                f"choose one of its options with {group}=<option> ({', '.join(options)}), or "
                if options
                else ""
            )
            raise ConfigError(
                f"{key_of(arg)} holds settings, not a value: {choose}set one of its keys, "
                f"{key_of(arg)}.<key>=<value> (`metacli {command} --cfg hydra` prints them)."
            )
    try:
        compose(command, [*overrides, *(a for a in given if gives_one(a))], True)
    except MetacliError:
        raise
    except Exception as err:  # Hydra stops with its own errors on some of its settings
        raise ConfigError(
            f"Hydra cannot apply {' '.join(given)} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check the hydra.* settings "
            f"against `metacli {command} --cfg hydra`, which prints them."
        ) from None


def check_sampled_sweep(command: str, args: list[str]) -> None:
    """A range (``interval(...)``) is sampled by a search sweeper (Optuna); Hydra's basic
    sweeper stops at it with a traceback."""
    sampled = sampled_sweeps(args) if multirun(args) and not informs(args) else []
    if not sampled:
        return
    fixed = [a for a in args if "=" in a and not a.startswith("-") and gives_one(a)]
    cfg = compose(command, fixed, keep_hydra=True)
    if str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
        raise ConfigError(
            f"{sampled[0]} is a range to sample, which only a search sweeper does: add "
            f"hparams_search=<a search config> (conf/hparams_search/maml_sinusoid.yaml is one) "
            f"or hydra/sweeper=optuna. The basic sweeper runs lists of values, e.g. "
            f"{key_of(sampled[0])}=0.001,0.01,0.1."
        )


PROGRESS_EVERY_S = 10.0


def check_sweep(command: str, args: list[str], first: DictConfig) -> None:
    """Every job of a sweep is checked before the first starts: a bad value met hours into
    a sweep is a sweep to run again. Each job's config is checked as its job would be; the
    first error names the job's swept values.

    ``first``: the first job's config. A job that differs from it only in values of plain
    settings gets them set on a copy of it (about 0.1 s a job); one that chooses other
    options (algo=..., a config group) is composed as Hydra will (about 0.3 s)."""
    jobs = sweep_jobs(args) or []
    swept = {key_of(o) for job in jobs for o in job if any(o not in other for other in jobs)}
    parser = OverridesParser.create()
    logging.disable(logging.WARNING)  # each job says its own notes when it runs
    said = time.monotonic()
    try:
        for done, job in enumerate(jobs):
            if time.monotonic() - said > PROGRESS_EVERY_S:  # (a long sweep's checks)
                print(
                    f"metacli {command}: checked {done:,} of the sweep's {len(jobs):,} job configs",
                    file=sys.stderr,
                    flush=True,
                )
                said = time.monotonic()
            changed = [o for o in job if o not in jobs[0]]
            try:
                cfg = with_values(first, [parser.parse_override(o) for o in changed])
                resolved = resolve(cfg if cfg is not None else compose(command, job))
                check_new_run(resolved, command, resuming=False)
            except MetacliError as err:
                which = " ".join(o for o in job if key_of(o) in swept)
                job_named = f"sweep's job with {which}" if which else "sweep"
                raise ConfigError(
                    f"The {job_named} cannot run, so no job was started: {err}"
                ) from None
    finally:
        logging.disable(logging.NOTSET)


def check_new_run(resolved: Resolved, command: str, resuming: bool) -> None:
    """What a run about to start needs: memory that fits, and, for a new training run,
    a task its algorithm's settings fit (``MetaAlgorithm.check_task``: a run already
    made is resumed and tested as it was)."""
    if command == "train" and resolved.run.ckpt_path:
        raise ConfigError(
            f"ckpt_path={resolved.run.ckpt_path} names the checkpoint that metacli test "
            f"meta-tests; metacli train does not read it. To meta-test it: metacli test "
            f"ckpt_path=...; to continue its run: metacli train resume=<its run folder>."
        )
    check_memory(resolved, command)
    if command == "train" and not resuming:
        resolved.classes["algo"].check_task(resolved.typed["algo"], resolved.classes["task"])


def with_values(cfg: DictConfig, overrides: list[Any]) -> DictConfig | None:
    """``cfg`` with plain ``key=value`` overrides set (parsed by Hydra's grammar); None
    where one chooses a config group, adds or deletes a key, or names a key ``cfg`` lacks."""
    changed = OmegaConf.masked_copy(cfg, [str(k) for k in cfg])  # a copy, typed as cfg
    for override in overrides:
        key = override.get_key_element()
        plain = override.package is None and not override.is_add() and not override.is_delete()
        if not plain or override.is_force_add() or "/" in key:
            return None
        node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if node is None or isinstance(node, DictConfig):  # a group, or a key cfg lacks
            return None
        OmegaConf.update(changed, key, override.value(), merge=False)
    return changed


def check_resume(folder: Path, effective: DictConfig) -> None:
    """Refuse a resume that changes what the run is; say when it has nothing to do."""
    from metacli.checkpoint import load_checkpoint, resumable
    from metacli.files import read_json

    checkpoint = load_checkpoint(resumable(folder) or folder / "checkpoints" / "last.pt")
    old = flatten(checkpoint.get("config") or {})
    new = flatten(OmegaConf.to_container(effective, resolve=True))
    # the run folder's own copy of a file the run named (composition.carried) is that file
    copies = {k: str((folder / name).resolve()) for k, name in CARRIED.items()}
    changed = sorted(
        k
        for k in old.keys() & new.keys()
        if old[k] != new[k]
        and not any(k == a or k.startswith(a) for a in RESUMABLE if a)
        and new[k] != copies.get(k)
    )
    if changed:
        lines = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"resume={folder} would change what the run is ({lines}). A resume continues the "
            f"same run: it may change only train.iterations (to extend it), test.* (to "
            f"meta-test again), and where it runs (device, threads, logger, data paths). "
            f"Start a new run for other settings."
        )
    done = int(checkpoint.get("iteration", 0))
    total = int(new.get("train.iterations", done))
    if total < done:
        raise ConfigError(
            f"train.iterations={total} is below the {done} iterations that {folder} has "
            f"done. Set train.iterations to {done} or more."
        )
    summary = read_json(folder / "summary.json") or {}
    retest = any(old.get(k) != v for k, v in new.items() if k.startswith("test."))
    if summary.get("status") == "finished" and total == done and not retest:
        raise NothingToDo(
            f"resume={folder}: the run finished its {done} iterations and its meta-test; "
            f"nothing to do. Extend it with train.iterations=<more than {done}>, or meta-test "
            f"it again with test.* settings (e.g. test.num_tasks=1000)."
        )
