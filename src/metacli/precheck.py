"""The checks that run before Hydra starts a job, so that no folder is made for nothing.

``precheck`` composes the config the way Hydra will and checks it against the schemas: a
misspelt key or option, an impossible value, or a resume that would change what a run
is, stops here with one paragraph, before any run folder exists. Hydra's own messages
("To append to your config use +...") are replaced by the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metacli.config import config_dir, flatten
from metacli.errors import ConfigError, MetacliError

# Flags after which Hydra prints something and runs no job.
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "-p")
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
    "resume",
    "ckpt_path",
)


class NothingToDo(MetacliError):
    """A resume of a finished run that adds nothing: said, and exit 0."""


def closest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if found:
        return found[0]
    tail = word.rsplit(".", 1)[-1]  # the right leaf in another section: train.inner_lr
    same = [c for c in candidates if c.rsplit(".", 1)[-1] == tail]
    return same[0] if same else None


def suggestion(word: str, candidates: list[str]) -> str:
    near = closest(word, candidates)
    return f" (did you mean {near}?)" if near else ""


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def multirun(args: list[str]) -> bool:
    """Whether the arguments ask Hydra for a sweep."""
    return any(a in ("-m", "--multirun") for a in args)


def informs(args: list[str]) -> bool:
    """Whether the arguments ask Hydra for information (--help, --cfg, ...), not a job."""
    return any(a.split("=")[0] in INFO_FLAGS for a in args)


def job_overrides(args: list[str]) -> list[str] | None:
    """The overrides of the job Hydra would run first (a sweep's first values); None when
    Hydra will run no job (--help, --cfg, ...) or the sweep cannot be expanded here."""
    if informs(args):
        return None
    overrides = [
        a for a in args if "=" in a and not a.startswith("-") and not key_of(a).startswith("hydra")
    ]
    if not multirun(args):
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports a malformed override better than we can
        return None
    first = []
    for override in parsed:
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None  # an interval for a sweeper to search
            value = next(iter(override.sweep_string_iterator()))
            first.append(f"{override.get_key_element()}={value}")
        else:
            first.append(override.input_line or "")
    return first


def compose(command: str, overrides: list[str]) -> DictConfig:
    """The config Hydra will compose, with Hydra's errors made one paragraph."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="metacli"):
            return hydra_compose(config_name=command, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain(command, overrides, str(err))) from None


def run_dir(command: str, args: list[str]) -> str:
    """The run folder Hydra would make for these arguments (``${now:...}`` resolved now)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's ${now:...} resolver
    given = [a for a in args if key_of(a) == "hydra.run.dir"]
    overrides = [*(job_overrides(args) or []), *given[-1:]]
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="metacli"):
        cfg = hydra_compose(config_name=command, overrides=overrides, return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def explain(command: str, overrides: list[str], message: str) -> str:
    """Hydra's composition error, as the setting to fix and the closest valid one."""
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        return (
            f"{group}={option} is not an option{suggestion(option, options)}. The options of "
            f"{group}: {', '.join(options)}."
        )
    bad = re.search(
        r"Could not (?:override|append to config\. An item is already at) '([^']+)'", message
    )
    if bad:
        key = bad.group(1)
        others = [o for o in overrides if key_of(o) != key]
        try:
            keys = list(flatten(OmegaConf.to_container(compose(command, others))))
        except ConfigError:
            keys = []
        if "already at" in message:
            return f"{key} already exists: set it without the leading +, as {key}=..."
        return (
            f"{key} is not a setting{suggestion(key, keys)}. `metacli {command} --cfg job` "
            f"prints every key."
        )
    return message.strip().splitlines()[0] + " Check that override (see `metacli train --help`)."


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


def precheck(command: str, args: list[str]) -> None:
    """Compose and check the first job's config; a resume must not change the run."""
    overrides = job_overrides(args)
    if overrides is None:
        return
    check_output_folder(command, args)
    cfg = compose(command, overrides)
    if multirun(args):
        return  # each job's values are checked in its job (a failed job is recorded)
    from metacli.build import resolve

    effective = resolve(cfg).effective
    if command == "test" and not cfg.get("ckpt_path"):
        raise ConfigError(
            "metacli test needs a checkpoint: add ckpt_path=<run folder>/checkpoints/best.pt "
            "(or last.pt)."
        )
    resume = cfg.get("resume") if command == "train" else None
    if resume:
        check_resume(Path(str(resume)), effective)


def check_resume(folder: Path, effective: DictConfig) -> None:
    """Refuse a resume that changes what the run is; say when it has nothing to do."""
    from metacli.checkpoint import load_checkpoint
    from metacli.files import read_json

    checkpoint = load_checkpoint(folder / "checkpoints" / "last.pt")
    old = flatten(checkpoint.get("config") or {})
    new = flatten(OmegaConf.to_container(effective, resolve=True))
    changed = sorted(
        k
        for k in old.keys() & new.keys()
        if old[k] != new[k] and not any(k == a or k.startswith(a) for a in RESUMABLE if a)
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
