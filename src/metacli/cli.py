"""The `metacli` command: subcommands dispatched to Hydra entry points.

Only the standard library is imported here, so `metacli --help` is instant; Hydra and
torch load when a subcommand runs.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from metacli import __version__
from metacli.errors import MetacliError
from metacli.extras import check_overrides

USAGE = f"""metacli {__version__}: meta-learning experiments from configs

Usage: metacli <command> [key=value overrides] [hydra flags]

Commands:
  train   meta-train, validate and meta-test; writes a run folder under outputs/train/
          e.g. metacli train algo=fomaml task.shots=5 seed=1
               metacli train -m algo=maml,fomaml seed=0,1,2     (a sweep)
               metacli train resume=outputs/train/<date>/<time> (continue a run)
  test    meta-test a checkpoint; reuses the run's config unless overridden
          e.g. metacli test ckpt_path=outputs/train/<date>/<time>/checkpoints/best.pt
  data    check: what a dataset holds per split and its problems; prepare: build its cache
          e.g. metacli data check task=omniglot data.root=../shared/data/omniglot
  compare one row per configuration of the runs below some folders, over seeds
          e.g. metacli compare outputs/multirun --format markdown --plot val.png
  plot    figures of one run, written into its folder (learning curves, inner steps,
          adaptation on regression tasks)   e.g. metacli plot outputs/train/<date>/<time>;
          of a sweep or any folder of runs, its comparison.png (validation curves with
          seed bands, the metric against inner steps, per configuration)
          e.g. metacli plot outputs/multirun/<date>/<time>
  runs    the runs below some folders (status, algorithm, seed, metric, age); rm removes
          those a filter selects   e.g. metacli runs outputs --status failed
               metacli runs rm outputs --status failed --status crashed --yes
  check   the contract of one component, yours included (strategies agree, resume,
          seeds, meta-gradient against finite differences)
          e.g. metacli check algo=maml   metacli check --config-dir myconf model=mine

Every command takes Hydra's flags: --help (config groups and options), --cfg job,
--info, -m/--multirun, --config-dir DIR. See `metacli train --help`.
"""

COMMANDS = ("train", "test", "data", "compare", "plot", "check", "runs")
DATA_ACTIONS = ("check", "prepare")


def train_task(cfg: Any, prechecked: Any = None) -> float:
    return job("train", cfg, prechecked)


def test_task(cfg: Any, prechecked: Any = None) -> float:
    return job("test", cfg, prechecked)


def job(command: str, cfg: Any, prechecked: Any) -> float:
    """A Hydra job: its config as the checks resolved it, when the job composed the same."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from metacli import run
    from metacli.composition import name_options

    name_options(cfg, HydraConfig.get().runtime.choices)
    resolved = None
    if prechecked is not None and OmegaConf.to_container(cfg) == OmegaConf.to_container(
        prechecked.cfg
    ):
        resolved = prechecked.resolved
    try:
        return run.COMMANDS[command](cfg, resolved=resolved)
    except SystemExit as stop:  # a signal: in a sweep, the sweep's table and how to go on
        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN and stop.code in (130, 143):
            from metacli import sweep

            sweep.interrupted(Path(hydra.sweep.dir), command)
        raise


# Module-level task functions: parallel launchers pickle them by reference, so their
# worker processes import this module, and this filter, before composing a job's config.
TASKS = {"train": train_task, "test": test_task}
# conf/hydra/launcher/*.yaml carry metacli's defaults for the launcher plugins under the
# plugins' own names, so Hydra checks them against the plugins' schemas: wanted, though
# Hydra warns that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")


def run_hydra(command: str, args: list[str], prechecked: Any = None) -> None:
    """Hydra's main with metacli's configs and options; ``prechecked``: the one job's
    config as the checks resolved it."""
    import hydra

    from metacli.composition import folders_of, informs, split_flags
    from metacli.config import config_dir
    from metacli.options import register

    register()
    if informs(args):
        search_config_folders(folders_of(args))
    flags, overrides = split_flags(args)
    sys.argv = [f"metacli {command}", *flags, *overrides]
    main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=command)

    def checked_job(cfg: Any) -> float:
        return TASKS[command](cfg, prechecked)

    main(checked_job if prechecked is not None else TASKS[command])()


def search_config_folders(folders: list[Path]) -> None:
    """Lists the options of the config folders (``--config-dir``) in --help and --info too.
    Hydra lists groups from the search path it starts with; the ``hydra.searchpath``
    override that carries the folders into a run (and its record) reaches only the
    composition, so the folders are also appended to the starting path, as Hydra's
    search-path plug-ins do."""
    if not folders:
        return
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class ConfigFolders(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for folder in folders:
                search_path.append("metacli --config-dir", f"file://{folder}")

    Plugins.instance().register(ConfigFolders)


def run_data(args: list[str]) -> None:
    if not args or args[0] not in DATA_ACTIONS:
        print(
            f"metacli data: choose one of: {', '.join(DATA_ACTIONS)}, e.g. metacli data check "
            f"task=omniglot data.root=DIR",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metacli import data_command

    try:
        action = data_command.check if args[0] == "check" else data_command.prepare
        raise SystemExit(action(args[1:]))
    except (HydraException, OmegaConfBaseException, MetacliError) as err:
        print(f"metacli data {args[0]}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_tool(command: str, args: list[str]) -> None:
    """compare, plot, check and runs: commands that start no Hydra job."""
    try:
        if command == "check":
            if not args or args[0] in ("-h", "--help"):
                print("usage: metacli check <group>=<option> [overrides] [--config-dir DIR]")
                raise SystemExit(0 if args else 2)
            from metacli import contract

            raise SystemExit(contract.main(args))
        if command == "runs":
            from metacli import runs_command

            raise SystemExit(runs_command.main(args))
        if command == "compare":
            from metacli import tables

            raise SystemExit(tables.main(args))
        if len(args) != 1 or args[0].startswith("-"):
            print("usage: metacli plot <run folder | folder of runs>", file=sys.stderr)
            raise SystemExit(2 if args != ["--help"] and args != ["-h"] else 0)
        folder = Path(args[0])
        if (folder / "summary.json").is_file() or not folder.is_dir():
            from metacli.plots import plot_run

            written = plot_run(folder)
        else:
            from metacli import tables

            written = [tables.plot_runs(folder)]
        for path in written:
            print(f"wrote {path}")
    except MetacliError as err:
        print(f"metacli {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"metacli {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"metacli: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}. "
            f"See `metacli --help`.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if command == "data":
        run_data(args)
        return
    if command in ("compare", "plot", "check", "runs"):
        run_tool(command, args)
        return
    from metacli import distributed
    from metacli.composition import value_of

    distributed.adopt_slurm_step(value_of(args, "distributed.nproc"))  # srun -n N metacli ...
    if distributed.from_env().active:  # one rank of torchrun's (or the launcher's) world
        run_hydra(command, join_world(command, args))
        return
    args, prechecked = checked(command, args)
    nproc = value_of(args, "distributed.nproc")
    from metacli.composition import informs, multirun

    one_job = not (multirun(args) or informs(args))  # a sweep, or --cfg/--help: no ranks
    if nproc is not None and nproc.isdigit() and int(nproc) > 1 and one_job:
        raise SystemExit(distributed.launch(command, args, int(nproc)))
    run_hydra(command, args, prechecked)


def entry() -> None:
    """The ``metacli`` command: ``main``, then, where it returned normally and no other
    thread must be waited for, the end of the process without the interpreter's teardown
    of every module (a noticeable part of a short run once torch is imported;
    docs/benchmarks.md, "The sinusoid end to end"). The exit handlers run and the output
    is flushed first, so nothing written is lost."""
    main()
    main_thread = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()):
        return  # (a worker still running: the usual exit waits for it)
    atexit._run_exitfuncs()  # logging's shutdown, the loggers' flushes, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def checked(command: str, args: list[str]) -> tuple[list[str], Any]:
    """The arguments for Hydra, once the config they compose has passed every check, and a
    single run's checked config; a failed check is one paragraph and exit 2, nothing to do
    is said and exit 0."""
    try:
        from metacli.composition import check_grammar, config_folders, prepare, settled

        check_grammar(args)
        check_overrides(args)
        from metacli.precheck import NothingToDo, precheck

        try:
            args, prechecked = settled(
                command,
                prepare(command, config_folders(args)),
                lambda args: precheck(command, args),
            )
        except NothingToDo as done:
            print(f"metacli {command}: {done}")
            raise SystemExit(0) from None
    except MetacliError as err:
        print(f"metacli {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, prechecked


def world_settings(command: str, args: list[str]) -> tuple[str, float]:
    """``distributed.backend`` and ``distributed.timeout_s`` as the config composes them
    (a preset may set them); their defaults where it does not compose, as rank 0 reports."""
    from metacli.composition import compose, config_folders, job_overrides, prepare
    from metacli.config import DistributedConfig

    try:
        overrides = job_overrides(prepare(command, config_folders(args))) or []
        settings = compose(command, overrides).distributed
    except MetacliError:
        settings = DistributedConfig()
    return str(settings.backend), float(settings.timeout_s)


def join_world(command: str, args: list[str]) -> list[str]:
    """One rank of a distributed run: join the process group, let rank 0 check the config
    and choose the run folder, and take both (the others print nothing of it).

    The world's size is what the launcher started: it is recorded as distributed.nproc.
    """
    from metacli import distributed
    from metacli.composition import multirun, override_key, quote

    world = distributed.from_env()
    if multirun(args):
        if world.writer:
            print(
                f"metacli {command}: a distributed run is one job; it cannot be combined with "
                f"-m/--multirun. Sweep with a launcher instead (README: Scaling out).",
                file=sys.stderr,
            )
        raise SystemExit(2)
    args = [a for a in args if override_key(a) != "distributed.nproc"]
    args.append(f"distributed.nproc={world.size}")
    try:
        distributed.initialize(*world_settings(command, args))
    except MetacliError as err:
        print(f"metacli {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    outcome: tuple[int, list[str]] = (0, [])
    if world.writer:
        try:
            args = checked(command, args)[0]
            from metacli.composition import run_dir

            if command in ("train", "test"):
                args = [*args, f"hydra.run.dir={quote(run_dir(command, args))}"]
            outcome = (0, args)
        except SystemExit as done:
            outcome = (int(done.code or 0), [])
    code, agreed = distributed.broadcast(outcome)
    if not agreed:
        distributed.shutdown()
        raise SystemExit(code)
    return agreed
