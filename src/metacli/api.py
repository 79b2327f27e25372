"""The Python API: metacli's commands from a notebook or a script, on the same run-folder
contract as the command line (one writer, files written whole, summary.json,
metrics.jsonl, metacli.log, checkpoints/), and a trained learner to adapt to new tasks.

    import metacli

    summary = metacli.train(["algo=fomaml", "train.iterations=200"])
    learner = metacli.load(summary["run_dir"])      # its best.pt (else last.pt)
    model = learner.adapt(x_support, y_support)     # the meta-test's inner loop
    predictions = model(x_query)
    rows = metacli.compare(["outputs"])             # metacli compare's rows

Every error is a :class:`metacli.MetacliError` whose message is the paragraph the command
prints (a run that fails is recorded in its folder first, as on the command line).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from metacli import run
from metacli.build import Components
from metacli.checkpoint import components_from
from metacli.comparison import compare as compare_runs
from metacli.composition import (
    SEARCHPATH,
    compose,
    config_folders,
    job_overrides,
    key_of,
    multirun,
    prepare,
    quote,
    settled,
    value_of,
)
from metacli.console import RunLogHandler, file_formatter, make_log_handler
from metacli.errors import MetacliError
from metacli.extras import check_overrides
from metacli.files import read_json
from metacli.precheck import NothingToDo, precheck
from metacli.run_folder import RunFolder
from metacli.tables import plain
from metacli.tasks.base import TaskBatch

PathLike = str | os.PathLike[str]


def train(
    overrides: Sequence[str] = (),
    run_dir: PathLike | None = None,
    config_dir: PathLike | Sequence[PathLike] | None = None,
) -> dict[str, Any]:
    """``metacli train OVERRIDES``: meta-train, then meta-test, in ``run_dir`` (default:
    outputs/train/<date>/<time>/ below the working directory); ``config_dir``: folders of
    your own configs (``--config-dir``). ``resume=<run folder>`` continues a run. Returns
    the run's summary (``summary.json``)."""
    return _run("train", overrides, run_dir, config_dir)


def test(
    overrides: Sequence[str] = (),
    run_dir: PathLike | None = None,
    config_dir: PathLike | Sequence[PathLike] | None = None,
) -> dict[str, Any]:
    """``metacli test ckpt_path=<checkpoint> OVERRIDES``: meta-test a checkpoint in a run
    folder of its own (default: outputs/test/<date>/<time>/). Returns its summary."""
    return _run("test", overrides, run_dir, config_dir)


test.__test__ = False  # type: ignore[attr-defined]  # (not a test, for pytest)


def _run(
    command: str,
    overrides: Sequence[str],
    run_dir: PathLike | None,
    config_dir: PathLike | Sequence[PathLike] | None,
) -> dict[str, Any]:
    if isinstance(overrides, str):
        raise MetacliError(
            f"metacli.{command} takes a list of overrides, e.g. metacli.{command}"
            f"(['algo=fomaml', 'seed=1']), not one string."
        )
    args = [str(o) for o in overrides]
    flags = [a for a in args if a.startswith("-")]
    if flags or multirun(args):
        raise MetacliError(
            f"metacli.{command} runs one job from key=value overrides; {flags[0]} is a flag "
            f"of the command line. Sweep with the command (metacli {command} -m ...) or call "
            f"metacli.{command} once per setting."
        )
    folders = [config_dir] if isinstance(config_dir, (str, os.PathLike)) else config_dir or []
    args = [*(f"--config-dir={folder}" for folder in folders), *args]
    check_overrides(args)
    args = prepare(command, config_folders(args))
    if run_dir is not None:
        if value_of(args, "hydra.run.dir") is not None:
            raise MetacliError("resume continues the run in its own folder: leave run_dir out.")
        args.append(f"hydra.run.dir={quote(str(Path(run_dir).resolve()))}")
    nproc = value_of(args, "distributed.nproc")
    if nproc is not None and nproc.isdigit() and int(nproc) > 1:
        raise MetacliError(
            "The Python API runs in this one process: distributed.nproc > 1 needs the "
            f"command (metacli {command} distributed.nproc={nproc} ...) or torchrun."
        )
    try:
        args, checked = settled(command, args, lambda args: precheck(command, args))
    except NothingToDo:  # a finished run with nothing to add: its summary
        return read_json(Path(str(value_of(args, "resume"))) / "summary.json") or {}
    cfg = _job_config(command, args)
    hydra = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    recorded = [a for a in job_overrides(args) or [] if not key_of(a).startswith("hydra")]
    recorded += [a for a in args if key_of(a) == SEARCHPATH]
    root = Path(hydra.runtime.output_dir)
    folder = RunFolder(root, recorded, command=command, cfg=cfg, hydra=hydra, raises=True)
    with _run_logging(root):
        run.COMMANDS[command](cfg, folder, checked.resolved if checked else None)
    return dict(folder.summary)


def _job_config(command: str, args: list[str]) -> DictConfig:
    """The job's config with Hydra's node, as Hydra's ``run_job`` completes it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()  # ${now:...}
    given = [a for a in args if key_of(a) == "hydra.run.dir"]
    cfg = compose(command, [*(job_overrides(args) or []), *given[-1:]], keep_hydra=True)
    with open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(Path(str(cfg.hydra.run.dir)).resolve())
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the config resolves
    return cfg


@contextmanager
def _run_logging(root: Path) -> Iterator[None]:
    """What Hydra's job logging gives a command: metacli.log and the console."""
    logger = logging.getLogger()
    file = RunLogHandler(str(root / "metacli.log"))
    file.setFormatter(file_formatter())
    handlers = [file, make_log_handler()]
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


# --- a trained learner ----------------------------------------------------------------------
@dataclass
class Adapted:
    """A learner adapted to one task's support set: ``model(x)`` predicts ``x``.

    Each call runs what the meta-test runs for a query set: the inner loop on the support
    set (its ``steps``), then the adapted network on ``x`` in one batch (with transductive
    batch norm the statistics are those of that batch, as in the meta-test)."""

    learner: Learner
    support_x: Tensor
    support_y: Tensor
    steps: int | None

    def __call__(self, x: Any) -> Tensor:
        return self.learner.predict(self.support_x, self.support_y, x, self.steps)


class Learner:
    """A trained learner, from a run folder or a checkpoint (``metacli.load``)."""

    def __init__(self, components: Components, checkpoint: dict[str, Any], path: Path) -> None:
        self.components = components
        self.checkpoint = checkpoint
        self.path = path  # the checkpoint it holds
        self.iteration = int(checkpoint["iteration"])

    @property
    def config(self) -> dict[str, Any]:
        """The effective config of the run that wrote the checkpoint."""
        container = OmegaConf.to_container(self.components.cfg, resolve=True)
        assert isinstance(container, dict)
        return {str(k): v for k, v in container.items()}

    def __repr__(self) -> str:
        cfg = self.components.cfg
        return (
            f"Learner(algo={cfg.algo.name}, task={cfg.task.name}, model={cfg.model.name}, "
            f"iteration {self.iteration}, {self.path})"
        )

    def adapt(self, x: Any, y: Any, steps: int | None = None) -> Adapted:
        """Adapt to the support set ``x`` [S, *input shape], ``y`` [S] (class labels
        0..N-1) or [S, *target shape]; ``steps``: inner steps (default: the run's
        ``algo.test_inner_steps``). Returns the adapted model, callable on new inputs."""
        support_x, support_y = self.tensors(x, "x"), self.tensors(y, "y")
        if support_x.shape[0] != support_y.shape[0]:
            raise MetacliError(
                f"adapt(x, y): x holds {support_x.shape[0]} examples and y "
                f"{support_y.shape[0]}; give one target per example."
            )
        algorithm = self.components.algorithm
        if steps is not None and not hasattr(algorithm, "test_steps"):
            raise MetacliError(
                f"algo={self.components.cfg.algo.name} has no inner loop: adapt(x, y) "
                f"takes no steps."
            )
        if steps is not None and steps < 0:
            raise MetacliError(f"adapt(..., steps={steps}): steps must be >= 0.")
        return Adapted(self, support_x, support_y, steps)

    def predict(self, support_x: Tensor, support_y: Tensor, x: Any, steps: int | None) -> Tensor:
        query_x = self.tensors(x, "x")
        task = self.components.task
        shape = (query_x.shape[0], *support_y.shape[1:])
        query_y = torch.zeros(shape, dtype=support_y.dtype)  # (not read: the metric's only)
        batch = TaskBatch(support_x[None], support_y[None], query_x[None], query_y[None])
        algorithm = self.components.algorithm
        saved = getattr(algorithm, "test_steps", None)
        if steps is not None:
            setattr(algorithm, "test_steps", steps)  # noqa: B010 (an Adaptive's)
        try:
            algorithm.eval()
            with torch.no_grad():
                result = algorithm.evaluate(batch.to(self.components.device), predictions=True)
        finally:
            if steps is not None:
                setattr(algorithm, "test_steps", saved)  # noqa: B010
        assert result.predictions is not None, task
        return result.predictions[0, -1].detach().cpu()  # the last step's

    def tensors(self, value: Any, which: str) -> Tensor:
        """``value`` as a tensor of the shape the task's examples (x) or targets (y) have."""
        tensor = torch.as_tensor(value)
        task = self.components.task
        if which == "x":
            shape = tuple(task.input_shape)
            if tuple(tensor.shape[1:]) != shape:
                raise MetacliError(
                    f"The learner's task ({self.components.cfg.task.name}) has inputs of shape "
                    f"{shape}; give x as [examples, {', '.join(map(str, shape))}], not "
                    f"{list(tensor.shape)}."
                )
            return tensor.to(torch.get_default_dtype())
        if task.is_classification:
            if tensor.dim() != 1 or tensor.is_floating_point():
                raise MetacliError(
                    f"The learner's task ({self.components.cfg.task.name}) is classification: "
                    f"give y as one integer label per example, 0..ways-1 (shape [examples])."
                )
            return tensor.long()
        return tensor.to(torch.get_default_dtype())


def load(path: PathLike, device: str = "cpu", checkpoint: str = "best") -> Learner:
    """The trained learner of a run folder (its ``checkpoints/<checkpoint>.pt``: best, else
    last) or of a checkpoint file, on ``device``."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints"
        candidates = [folder / f"{checkpoint}.pt", folder / "last.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise MetacliError(
                f"{path} holds no checkpoint ({candidates[0]} nor {candidates[1]}). Give a run "
                f"folder of metacli train, or a checkpoint file."
            )
        path = found
    components, saved = components_from(path, device)
    components.algorithm.eval()
    return Learner(components, saved, path)


def compare(paths: Sequence[PathLike] = ("outputs",), **options: Any) -> list[dict[str, Any]]:
    """``metacli compare PATHS``: one row (a dict) per configuration of the runs below
    ``paths``. Options as the command's flags: ``group_by`` (a list of keys), ``sort``,
    ``reverse``, ``filters`` (["algo=maml", ...]), ``metric`` ("test" or "val"),
    ``command`` ("train" or "test"), ``baseline`` (["algo=maml", ...]). NaN and infinite
    values are None, as in ``--format json``."""
    known = {"group_by", "sort", "reverse", "filters", "metric", "command", "baseline"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MetacliError(
            f"metacli.compare has no option {unknown[0]!r}; the options are "
            f"{', '.join(sorted(known))}."
        )
    for key in ("group_by", "baseline"):
        if isinstance(options.get(key), str):
            options[key] = [k.strip() for k in options[key].split(",") if k.strip()]
    return list(plain(compare_runs([Path(p) for p in paths], **options).rows))
