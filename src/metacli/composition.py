"""Composing a config the way Hydra will, for the checks before a run and the Python API.

- A run's own arguments: ``resume`` and ``ckpt_path`` replay the overrides of the run that
  wrote the checkpoint (``prepare``), the new arguments winning.
- The user's config folders: ``--config-dir DIR`` becomes Hydra's ``hydra.searchpath``
  override (``config_folders``), so the checks, every job of a sweep, ``--help`` and a
  later ``test`` or ``resume`` (which replay a run's overrides) all see the same folders.
- ``compose``: the config Hydra composes, each option of a config file with a
  ``_target_`` named after its file, Hydra's errors made one paragraph.
- ``settled``, ``settable``: a key that the selected option's class declares can be set on
  the command line even where its config file does not list it (``++``), and in a sweep
  over options a key that only some have applies to those (the others ignore it, said
  once).
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

from metacli.checkpoint import load_checkpoint, resumable, sweep_jobs_in, tested_run
from metacli.config import config_dir, flatten, is_path_key
from metacli.errors import ConfigError, MetacliError
from metacli.options import declared_keys, register
from metacli.registry import GROUPS, available

# Flags after which Hydra prints something and runs no job.
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "-p")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
# Hydra's choice of the primary config and its folder: metacli composes its own
PRIMARY_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp")
SEARCHPATH = "hydra.searchpath"
COMPONENT_SECTIONS = ("algo", "model", "task")  # the sections a config file's _target_ fills
T = TypeVar("T")


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# Hydra's flags that take the next argument as their value (--info takes one of its topics)
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """The flags (with their values) and the overrides, each in the order given. Hydra's
    parser takes the overrides as one run of arguments: ``a=1 -m b=1,2`` stops it at
    ``b=1,2`` ("unrecognized arguments"), so metacli hands them to it after the flags."""
    flags: list[str] = []
    overrides: list[str] = []
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        if arg in (*VALUE_FLAGS, *CONFIG_DIR_FLAGS, *PRIMARY_CONFIG_FLAGS):
            flags += [v for v in [next(rest, None)] if v is not None]
        elif arg in ("--info", "-i"):
            topic = next(rest, None)
            if topic in INFO_TOPICS:
                flags.append(topic)
            elif topic is not None:
                overrides.append(topic)
    return flags, overrides


# Hydra's grammar reads a 20,000-item list in about 30 s, and metacli composes it several times
MAX_OVERRIDE_CHARS = 20_000


def gives_one(arg: str) -> bool:
    """Whether an override gives one value (not a sweep); a malformed one counts as one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return not OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:
        return True


def check_grammar(args: list[str]) -> None:
    """Every override as Hydra's grammar reads it; a malformed one is named, with the
    forms that are read, before Hydra's parser error (exit 1, its grammar's tokens)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in split_flags(args)[1]:
        if len(arg) > MAX_OVERRIDE_CHARS:
            raise ConfigError(
                f"{key_of(arg)}=... is {len(arg):,} characters long, more than the "
                f"{MAX_OVERRIDE_CHARS:,} an override may have: Hydra's parser takes minutes "
                f"over such a value. Put it in a config file of your own (--config-dir DIR) "
                f"and choose that file."
            )
        try:
            parser.parse_override(arg)
        except Exception as err:
            key, _, value = arg.partition("=")
            if value.startswith("~"):
                raise ConfigError(
                    f"{arg}: Hydra does not read a value that starts with ~. Quote it, "
                    f"{key}='{value}' (metacli expands ~ in paths), or write the path out."
                ) from None
            hydra = " ".join(str(err).split())
            hydra = hydra.split(" See https://")[0].rstrip(".")
            raise ConfigError(
                f"{arg} cannot be read as an override (Hydra: {hydra}). Write key=value; "
                f"several values to sweep as key=a,b with -m; a list as key=[a,b]; a value "
                f"with spaces, commas or brackets in quotes, key='a b'."
            ) from None


def multirun(args: list[str]) -> bool:
    """Whether the arguments ask Hydra for a sweep: -m, or a search config, which sets
    ``hydra.mode: MULTIRUN`` itself (conf/hparams_search)."""
    return any(
        a in ("-m", "--multirun")
        or (key_of(a) == "hparams_search" and not a.endswith("=null"))
        or (key_of(a) == "hydra.mode" and a.endswith("=MULTIRUN"))
        for a in args
    )


def informs(args: list[str]) -> bool:
    """Whether the arguments ask Hydra for information (--help, --cfg, ...), not a job."""
    return any(a.split("=")[0] in INFO_FLAGS for a in args)


def closest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if found:
        return found[0]
    tail = word.rsplit(".", 1)[-1]  # the right leaf in another section: train.inner_lr
    same = [c for c in candidates if c.rsplit(".", 1)[-1] == tail]
    return same[0] if same else None


def rule_owners(key: str) -> list[str]:
    """The update rules whose own settings include ``key`` (``algo.<setting>``)."""
    group, _, name = key.partition(".")
    if group != "algo" or not name or "." in name:
        return []
    from metacli.options import option_keys

    return sorted(rule for rule, keys in option_keys("update").items() if name in keys)


def suggestion(word: str, candidates: list[str]) -> str:
    near = closest(word, candidates)
    return f" (did you mean {near}?)" if near else ""


# --- the user's config folders ---------------------------------------------------------
def searchpath_entries(args: list[str]) -> list[str]:
    """The entries of a ``hydra.searchpath=[...]`` override (``file://DIR``, ``pkg://...``)."""
    values = [a.split("=", 1)[1] for a in args if key_of(a) == SEARCHPATH]
    if not values:
        return []
    listed = values[-1].strip().strip("[]")
    return [e.strip().strip("'\"") for e in listed.split(",") if e.strip()]


def folders_of(args: list[str]) -> list[Path]:
    """The config folders (``file://`` entries) of a ``hydra.searchpath`` override."""
    return [
        Path(e.removeprefix("file://"))
        for e in searchpath_entries(args)
        if "://" not in e or e.startswith("file://")
    ]


def config_folders(args: list[str]) -> list[str]:
    """``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) as an absolute
    ``hydra.searchpath`` override, merged with one given (its folders made absolute too,
    so that a run's record replays from anywhere); each folder must exist."""
    out: list[str] = []
    folders: list[Path] = []
    rest = iter(args)
    for arg in rest:
        flag, eq, value = arg.partition("=")
        if flag in PRIMARY_CONFIG_FLAGS:
            raise ConfigError(
                f"{flag}: metacli train and metacli test always start from their own config "
                f"(conf/train.yaml, conf/test.yaml). Put your settings in a preset instead, "
                f"DIR/experiment/NAME.yaml (`# @package _global_` on its first line), and run "
                f"with --config-dir DIR experiment=NAME."
            )
        if flag in CONFIG_DIR_FLAGS:
            given = value if eq else next(rest, None)
            if not given:
                raise ConfigError(f"{flag} needs a folder: {flag} DIR (e.g. --config-dir myconf).")
            folders.append(Path(given))
        elif key_of(arg) != SEARCHPATH:
            out.append(arg)
    folders = [f.expanduser().resolve() for f in [*folders_of(args), *folders]]
    others = [e for e in searchpath_entries(args) if "://" in e and not e.startswith("file://")]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(
                f"The config folder {folder} (--config-dir, or hydra.searchpath, which a run "
                f"records to replay with test and resume) does not exist. Give an existing "
                f"folder with --config-dir DIR."
            )
    if not folders and not others:
        return out
    entries = [*(f"file://{f}" for f in dict.fromkeys(folders)), *others]
    override = f"{SEARCHPATH}=[{','.join(json.dumps(e) for e in entries)}]"
    # with the other overrides: Hydra's parser takes one run of them
    at = next((i for i, a in enumerate(out) if "=" in a and not a.startswith("-")), len(out))
    return [*out[:at], override, *out[at:]]


def options_of(group: str, folders: list[Path]) -> list[str]:
    """A group's options: the built-ins, the plug-ins and the files of each config folder
    (Hydra's own groups, hydra/*: as Hydra lists them, its plug-ins' included)."""
    if group.startswith("hydra/"):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    files = {p.stem for d in [config_dir(), *folders] for p in (d / group).glob("*.yaml")}
    return sorted(files | (set(available(group)) if group in GROUPS else set()))


def file_options(group: str, option: str, folders: list[Path]) -> list[Path]:
    """The user's config files that define ``group=option``."""
    return [
        f / group / f"{option}.yaml" for f in folders if (f / group / f"{option}.yaml").is_file()
    ]


# --- a run's own arguments (resume, test) -----------------------------------------------
# Keys that point at an earlier run: they are never replayed from it.
RUN_KEYS = ("resume", "ckpt_path")


def override_key(arg: str) -> str | None:
    """The key an override sets (``+a.b=1`` -> ``a.b``); None for flags and their values."""
    if arg.startswith("-") or "=" not in arg:
        return None
    return arg.split("=", 1)[0].lstrip("+~")


def quote(value: str) -> str:
    return value if re.fullmatch(r"[\w./:-]+", value) else "'" + value.replace("'", r"\'") + "'"


def replay(saved: list[str], args: list[str]) -> list[str]:
    """The saved overrides of a run, minus those the new arguments set again, then the new ones."""
    new_keys = {override_key(a) for a in args} - {None}
    kept = [o for o in saved if override_key(o) not in new_keys and override_key(o) not in RUN_KEYS]
    return kept + args


def value_of(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if override_key(a) == key]
    return values[-1] if values and values[-1] not in ("", "null") else None


def absolute_paths(args: list[str]) -> list[str]:
    """Path settings made absolute, as this working directory resolves them, so that a
    run records where its files are and ``metacli test``/``resume`` find them from any
    directory (a sweep's comma-separated values, interpolations and null are left alone)."""
    made = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = value.strip("'\"")
        if (
            sep
            and not arg.startswith("-")
            and is_path_key(key.lstrip("+~"))
            and bare not in ("", "null", "None")
            and not any(c in bare for c in ",${}[]")
            and not os.path.isabs(os.path.expanduser(bare))
        ):
            arg = f"{key}={quote(os.path.abspath(os.path.expanduser(bare)))}"
        made.append(arg)
    return made


def prepare(command: str, args: list[str]) -> list[str]:
    """Arguments for Hydra, path settings made absolute; ``resume`` and ``ckpt_path``
    replay the overrides of their run."""
    args = absolute_paths(args)
    resume = value_of(args, "resume") if command == "train" else None
    if resume is not None:
        if multirun(args):
            raise MetacliError(
                "resume continues one run; it cannot be combined with -m/--multirun."
            )
        folder = Path(resume)
        last = resumable(folder)
        if last is None:
            jobs, tested = sweep_jobs_in(folder), tested_run(folder)
            instead = (
                f" It is a sweep's folder: resume one of its jobs (resume={jobs[0]}), or "
                f"continue the sweep with its own command and hydra.sweep.dir={folder} "
                f"skip_finished=true."
                if jobs
                else f" It is a meta-test's folder (metacli test): resume the training run it "
                f"tested, resume={tested}."
                if tested
                else " Set resume to the folder of a training run (the one that holds its "
                "summary.json and checkpoints/)."
            )
            raise MetacliError(
                f"resume={resume}: {folder} is not a run folder with a checkpoint "
                f"(expected {folder / 'checkpoints' / 'last.pt'}).{instead}"
            )
        saved = [str(o) for o in load_checkpoint(last).get("overrides", [])]
        return [*replay(carried(saved, folder), args), f"hydra.run.dir={quote(str(folder))}"]
    ckpt_path = value_of(args, "ckpt_path") if command == "test" else None
    swept = ckpt_path is not None and not gives_one(f"ckpt_path={ckpt_path}")
    if swept and multirun(args) and not Path(str(ckpt_path)).exists():
        raise MetacliError(
            f"ckpt_path={ckpt_path} sweeps checkpoints: metacli test meta-tests one "
            f"checkpoint a run, with the settings of the run that wrote it. Meta-test "
            f"each in turn (for c in A B; do metacli test ckpt_path=$c; done); a sweep "
            f"may vary the test.* settings of one checkpoint."
        )
    if ckpt_path is not None:
        saved = [str(o) for o in load_checkpoint(ckpt_path).get("overrides", [])]
        runs = [p for p in Path(ckpt_path).parents[:3] if (p / "summary.json").is_file()]
        return replay(carried(saved, runs[0]) if runs else saved, args)
    return args


# Settings that name a file a run folder keeps a copy of (``Model.carried``)
CARRIED = {"model.genotype": "genotype.json"}


def carried(saved: list[str], run: Path) -> list[str]:
    """A run's saved overrides, with the copies its folder keeps in place of the files
    they named (which may have moved since)."""
    replaced = []
    for override in saved:
        copy = run / CARRIED.get(str(override_key(override)), "")
        if override_key(override) in CARRIED and copy.is_file():
            override = f"{override_key(override)}={quote(str(copy.resolve()))}"
        replaced.append(override)
    return replaced


# --- composing ---------------------------------------------------------------------------
def job_overrides(args: list[str]) -> list[str] | None:
    """The overrides of the job Hydra would run first (a sweep's first values); None when
    Hydra will run no job (--help, --cfg, ...) or the sweep cannot be expanded here."""
    jobs = sweep_jobs(args, limit=1)
    return jobs[0] if jobs else None


# A sweep of more jobs than this is checked value by value (each value of each swept key
# once, with the first values of the others), not combination by combination.
CHECKED_COMBINATIONS = 64
# More jobs than this in one sweep is a mistake far more often than a plan, and its check
# alone would take hours (about 0.1 s a job).
MAX_SWEEP_JOBS = 10_000


def sweep_values(args: list[str]) -> list[list[str]] | None:
    """Each override's values as ``key=value`` lines (one for an override that sweeps
    nothing); None when Hydra will run no job (--help, --cfg, ...) or the sweep cannot be
    expanded here (an interval for a sweeper)."""
    if informs(args):
        return None
    overrides = [
        a
        for a in args
        if "=" in a
        and not a.startswith("-")
        and (not key_of(a).startswith("hydra") or key_of(a) == SEARCHPATH)
    ]
    if not multirun(args):
        return [[o] for o in overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports a malformed override better than we can
        return None
    choices: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None  # an interval for a sweeper to search
            key = override.get_key_element()
            glob = override.value()
            if isinstance(glob, Glob):  # (Hydra's own expansion needs its config loader)
                values = glob.filter(options_of(key, folders_of(args)))
            else:
                values = list(override.sweep_string_iterator())
            if not values:
                raise ConfigError(
                    f"{override.input_line} gives no values, so the sweep would run no job. "
                    f"Give values that exist, e.g. seed=range(0,3) (from 0 up to 3, without "
                    f"3) or algo=maml,fomaml."
                )
            choices.append([f"{key}={value}" for value in values])
        else:
            choices.append([override.input_line or ""])
    jobs = math.prod(len(values) for values in choices)
    if jobs > MAX_SWEEP_JOBS:
        raise ConfigError(
            f"The sweep has {jobs:,} jobs, more than the {MAX_SWEEP_JOBS:,} one sweep may run "
            f"(each job is a run folder, and every job is checked before the first starts). "
            f"Sweep fewer values, or split it, e.g. seed=range(0,5000) and then "
            f"seed=range(5000,10000)."
        )
    return choices


def sweep_jobs(args: list[str], limit: int | None = None) -> list[list[str]] | None:
    """The overrides of the jobs Hydra's basic sweeper would run, in its order (the
    product of the swept values); past ``CHECKED_COMBINATIONS`` jobs or ``limit``, the
    first job and one job per other value of each swept key (``sweep_values``: None)."""
    choices = sweep_values(args)
    if choices is None:
        return None
    count = math.prod(len(values) for values in choices)
    if (limit is not None and limit < count) or count > CHECKED_COMBINATIONS:
        first = [values[0] for values in choices]
        jobs = [first] + [
            [*first[:i], value, *first[i + 1 :]]
            for i, values in enumerate(choices)
            for value in values[1:]
        ]
        return jobs[:limit] if limit is not None else jobs
    return [list(job) for job in itertools.product(*choices)]


def name_options(cfg: DictConfig, choices: Any) -> None:
    """A section filled by a config file with a ``_target_`` is named after its file (the
    option chosen), whatever ``name`` the file inherited."""
    for group in COMPONENT_SECTIONS:
        node, chosen = cfg.get(group), choices.get(group) if choices else None
        if isinstance(node, DictConfig) and "_target_" in node and chosen:
            with open_dict(node):
                node.name = str(chosen)


def hydra_compose(command: str, overrides: list[str], with_hydra: bool = True) -> DictConfig:
    """Hydra's composition (with its own node, ``hydra``, if asked): the raw errors."""
    from hydra import compose as compose_config
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="metacli"):
        return compose_config(
            config_name=command, overrides=overrides, return_hydra_config=with_hydra
        )


def compose(command: str, overrides: list[str], keep_hydra: bool = False) -> DictConfig:
    """The config Hydra will compose, options named, with Hydra's errors made one
    paragraph; ``keep_hydra`` keeps Hydra's node (choices, run folder)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import MarkedYAMLError, YAMLError

    try:
        cfg = hydra_compose(command, overrides, with_hydra=keep_hydra)
        named = [g for g in COMPONENT_SECTIONS if "_target_" in (cfg.get(g) or {})]
        if named and not keep_hydra:  # the options' names are Hydra's choices
            cfg = hydra_compose(command, overrides)
    except YAMLError as err:  # a config file of the user's that is not YAML
        mark = err.problem_mark if isinstance(err, MarkedYAMLError) else None
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem if isinstance(err, MarkedYAMLError) else str(err)
        context = f" ({err.context})" if isinstance(err, MarkedYAMLError) and err.context else ""
        raise ConfigError(
            f"A config file is not valid YAML: {where}: {problem}{context}. Fix that file."
        ) from None
    except (HydraException, OmegaConfBaseException) as err:
        message = explain(command, overrides, str(err))
        refused = re.search(r"Could not override '([^']+)'", str(err))
        if refused and refused.group(1).split(".")[0] in COMPONENT_SECTIONS:
            raise NotASetting(message) from None
        raise ConfigError(message) from None
    if "hydra" in cfg:
        name_options(cfg, cfg.hydra.runtime.choices)
    if not keep_hydra and "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_dir(command: str, args: list[str]) -> str:
    """The run folder Hydra would make for these arguments (``${now:...}`` resolved now)."""
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's ${now:...} resolver
    given = [a for a in args if key_of(a) == "hydra.run.dir"]
    cfg = hydra_compose(command, [*(job_overrides(args) or []), *given[-1:]])
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def choosing_files(group: str, option: str, folders: list[Path]) -> list[Path]:
    """The config files whose defaults list chooses ``group: option``."""
    line = re.compile(rf"^\s*-\s*(override\s+)?/?{re.escape(group)}\s*:\s*{re.escape(option)}\s*$")
    return [
        path
        for folder in [*folders, config_dir()]
        for path in sorted(folder.rglob("*.yaml"))
        if any(line.match(text) for text in path.read_text(errors="replace").splitlines())
    ]


def explain(command: str, overrides: list[str], message: str) -> str:
    """Hydra's composition error, as the setting to fix and the closest valid one."""
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:
        group, option = missing.groups()
        folders = folders_of(overrides)
        options = options_of(group, folders)
        chosen = choosing_files(group, option, folders)
        on_command_line = any(key_of(o) == group for o in overrides)
        where_chosen = f" (chosen in {chosen[0]})" if chosen and not on_command_line else ""
        where = (
            f" (searched the built-in options and {', '.join(str(f) for f in folders)})"
            if folders
            else " (a folder of your own: --config-dir DIR with DIR/<group>/<option>.yaml)"
        )
        return (
            f"{group}={option}{where_chosen} is not an option{suggestion(option, options)}. "
            f"The options of "
            f"{group}: {', '.join(options)}{where}."
        )
    bad = re.search(
        r"Could not (?:override|append to config\. An item is already at) '([^']+)'", message
    )
    if bad:
        key = bad.group(1)
        others = [o for o in overrides if key_of(o) != key]
        try:
            cfg = compose(command, others)
            keys = list(flatten(OmegaConf.to_container(cfg)))
            for group in COMPONENT_SECTIONS:  # what the options declare, listed or not
                keys += [f"{group}.{k}" for k in declared_keys(group, cfg[group])]
        except ConfigError:
            keys = []
        if "already at" in message:
            return f"{key} already exists: set it without the leading +, as {key}=..."
        rules = rule_owners(key)
        if rules and not any(key_of(o) == "update" for o in overrides):
            return (
                f"{key} is a setting of update={' or update='.join(rules)}, and no update "
                f"rule is chosen. Choose one as a group, update={rules[0]} (not "
                f"algo.update=...): that puts its settings into algo."
            )
        part = "hydra" if key.startswith("hydra.") else "job"
        return (
            f"{key} is not a setting{suggestion(key, keys)}. `metacli {command} --cfg {part}` "
            f"prints every key."
        )
    sweep = re.search(
        r"Ambiguous value for argument '([^']+)'|Sweep parameters '([^']+)' requires", message
    )
    if sweep:
        given = sweep.group(1) or sweep.group(2)
        return (
            f"{given} gives several values, which is a sweep: add -m (metacli {command} -m "
            f"{given} ...), or write one value. A list value is written in brackets: "
            f"key=[a,b]."
        )
    return message.strip().splitlines()[0] + " Check that override (see `metacli train --help`)."


def sampled_sweeps(args: list[str]) -> list[str]:
    """The overrides that only a search sweeper can run (``interval(...)``), as given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    found = []
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports a malformed override better than we can
            continue
        if override.is_sweep_override() and not override.is_discrete_sweep():
            found.append(arg)
    return found


# --- keys the options declare --------------------------------------------------------------
def component_key(arg: str) -> tuple[str, str] | None:
    """(group, first key) of a plain ``algo.key=value`` override; None for anything else."""
    if arg.startswith(("-", "+", "~")) or "=" not in arg:
        return None
    group, dot, rest = arg.split("=", 1)[0].partition(".")
    return (group, rest.split(".")[0]) if dot and group in COMPONENT_SECTIONS else None


def swept_options(args: list[str]) -> dict[str, list[str]]:
    """The options of each component group a sweep runs (``algo=maml,anil``)."""
    if not multirun(args):
        return {}
    return {
        key: value.split(",")
        for key, value in (a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
        if key in COMPONENT_SECTIONS and "," in value
    }


class NotASetting(ConfigError):
    """Hydra refused to set a key of a component's section (it is not in the section)."""


def settled(command: str, args: list[str], check: Callable[[list[str]], T]) -> tuple[list[str], T]:
    """``check(args)`` (the checks before a run, a composition), with the arguments made
    ``settable`` first in a sweep over options, or once a key was refused."""
    if swept_options(args):
        args = settable(command, args)
    try:
        return args, check(args)
    except NotASetting:
        fixed = settable(command, args)
        if fixed == args:
            raise
    return fixed, check(fixed)


def settable(command: str, args: list[str]) -> list[str]:
    """The arguments with ``++`` before a component key that Hydra would refuse although
    the option's class declares it (a config file need not list every inherited key), and
    before a key that only some options of a sweep have (the others ignore it: said here,
    and warned in their logs). A key that no option declares is left to fail by name."""
    first = job_overrides(args)
    plain = [a for a in args if component_key(a) is not None]
    if first is None or not plain:
        return args
    base = [o for o in first if component_key(o) is None]
    swept = swept_options(args)
    try:
        cfg = compose(command, base)
        keys: dict[str, dict[str, tuple[set[str], set[str]]]] = {}
        for group in sorted({found[0] for a in plain if (found := component_key(a))}):
            keys[group] = {}
            for option in swept.get(group) or [str(cfg[group].name)]:
                node = cfg[group] if option not in swept.get(group, []) else None
                if node is None:
                    node = compose(command, [*base, f"{group}={option}"])[group]
                keys[group][option] = (set(node), declared_keys(group, node))
    except ConfigError:
        return args  # the checks that follow name the problem
    out = []
    for arg in args:
        found = component_key(arg)
        if found is not None:
            group, key = found
            options = keys[group]
            declaring = [o for o, (_, declared) in options.items() if key in declared]
            if declaring and any(key not in listed for listed, _ in options.values()):
                lacking = [o for o in options if o not in declaring]
                if lacking:
                    print(
                        f"metacli: {group}.{key} is not a setting of {group}="
                        f"{','.join(lacking)}; applying it as ++{arg}, which those options "
                        f"ignore.",
                        file=sys.stderr,
                    )
                arg = f"++{arg}"
        out.append(arg)
    return out
