"""Typed schemas for every config section, and the check that runs before any work.

Hydra composes plain YAML from ``conf/``; this module turns each section into a
dataclass. A misspelt key, a wrong type or an impossible value (``task.shots=0``)
becomes a :class:`ConfigError` that names the key to fix. The component groups
(``algo``, ``task``, ``model``) are checked against the ``Config`` dataclass of the
class the registry finds for them, so a new algorithm brings its own schema.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from metacli.errors import ConfigError


def is_path_key(key: str) -> bool:
    """A setting that names a file or folder (data.root, data.cache_dir, resume, ckpt_path,
    model.genotype, any ``*_dir`` or ``*_path``); Hydra's own are left to Hydra."""
    last = key.rsplit(".", 1)[-1]
    return not key.startswith("hydra") and (
        last in ("root", "resume", "ckpt_path", "genotype") or last.endswith(("_dir", "_path"))
    )


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(
            f"{key}={shown(value)} is not allowed: {rule}. Set {key} to a valid value."
        )


def shown(value: Any, most: int = 8) -> str:
    """``repr(value)``; a long list as its first items and its length."""
    if isinstance(value, (list, tuple)) and len(value) > most:
        return f"[{', '.join(map(repr, value[:most]))}, ... ({len(value):,} items)]"
    return repr(value)


# Layers (an MLP's hidden widths) and cells (an architecture search's network): more
# than this takes minutes to build and never trains in a useful time.
MAX_LAYERS = 1_000


# A float setting's field metadata where +inf means something (a limit, e.g. algo.lam=inf):
# every other float setting must be finite, and NaN never is (``require_finite``).
INF_ALLOWED = {"inf_allowed": True}
# Settings meet float32 tensors (learning rates in the optimizers' foreach kernels, scales
# of tasks): a value beyond float32's range is infinite there, or stops torch with an
# overflow error.
FLOAT32_MAX = 3.4028234663852886e38


def require_finite(value: Any, key: str, inf_allowed: bool = False) -> None:
    """Every float in ``value`` (a dataclass, list or dict of them) is finite; +inf only
    where the field's metadata allows it (``INF_ALLOWED``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for part in dataclasses.fields(value):
            inner = getattr(value, part.name)
            require_finite(
                inner,
                f"{key}.{part.name}" if key else part.name,
                bool(part.metadata.get("inf_allowed")),
            )
    elif isinstance(value, (list, tuple)):
        for item in value:
            require_finite(item, key, inf_allowed)
    elif isinstance(value, dict):
        for name, item in value.items():
            require_finite(item, f"{key}.{name}", inf_allowed)
    elif (
        isinstance(value, float)
        and not abs(value) <= FLOAT32_MAX
        and not (inf_allowed and value == math.inf)
    ):
        rule = "it must be a finite number" + (" or inf" if inf_allowed else "")
        if math.isfinite(value):
            rule += f" within float32's range (at most {FLOAT32_MAX:.4g} in size)"
        require(False, key, value, rule)


# numpy seeds its generator from 32 bits (torch from 64): every seed must suit both.
MAX_SEED = 2**32 - 1
# torch's thread pool fails to start (or the process is killed) far beyond a machine's
# cores; more threads than cores only slow it (docs/threads.md).
MAX_THREADS = 1024


def require_seed(key: str, value: int) -> None:
    require(0 <= value <= MAX_SEED, key, value, f"it must be >= 0 and at most {MAX_SEED:,}")


def require_threads(key: str, value: int | None) -> None:
    require(
        value is None or 1 <= value <= MAX_THREADS,
        key,
        value,
        f"it must be >= 1 and at most {MAX_THREADS:,}, or null (threads=null chooses for "
        f"this machine and this work)",
    )


# Steps a task takes at every iteration (inner steps, conjugate-gradient steps, fine-tuning
# passes): more than this never ends in a useful time, and one iteration cannot be
# interrupted between two of them.
MAX_STEPS = 100_000


def require_steps(key: str, value: int | None, low: int, null: bool = False) -> None:
    """``low`` <= ``value`` <= ``MAX_STEPS`` (or null where ``null`` allows it)."""
    require_at_least(key, value, low, null=null)
    require(
        value is None or value <= MAX_STEPS,
        key,
        value,
        f"it must be at most {MAX_STEPS:,} (every task takes that many at every iteration or "
        f"evaluation; more never ends in a useful time)",
    )


def require_at_least(
    key: str, value: Any, low: float, strict: bool = False, null: bool = False, what: str = "it"
) -> None:
    """``value`` >= ``low`` (> with ``strict``), or null where ``null`` allows it."""
    ok = (null and value is None) or (
        value is not None and (value > low if strict else value >= low)
    )
    rule = f"{what} must be {'>' if strict else '>='} {low:g}{' or null' if null else ''}"
    require(ok, key, value, rule)


@functools.cache
def merged_schema(name: str, *parts: type) -> type:
    """One dataclass with the fields of ``parts`` (settings that land in one section, e.g. an
    update rule's and its algorithm's), each part's ``__post_init__`` check run, the last
    part's first; parts without fields are left out."""
    bases = tuple(dict.fromkeys(p for p in parts if dataclasses.fields(p)))
    if len(bases) <= 1:
        return bases[0] if bases else parts[-1]

    def post_init(self: Any) -> None:
        for part in reversed(bases):
            check = getattr(part, "__post_init__", None)
            if check is not None:
                check(self)

    return dataclasses.make_dataclass(name, [], bases=bases, namespace={"__post_init__": post_init})


def require_ranges(section: str, config: Any, *keys: str) -> None:
    """Each ``[low, high]`` setting of ``config`` has two numbers with low <= high."""
    for key in keys:
        low_high = getattr(config, key)
        require(
            len(low_high) == 2 and low_high[0] <= low_high[1],
            f"{section}.{key}",
            low_high,
            "give [low, high] with low <= high",
        )


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    threads: int | None = None  # torch CPU threads (null: see the top-level threads)

    def __post_init__(self) -> None:
        require(
            self.name in ("auto", "cpu", "cuda", "mps"),
            "device",
            self.name,
            "choose one of auto, cpu, cuda, mps",
        )
        require_threads("device.threads", self.threads)


# The outer optimizer's parameter groups an algorithm may have: the initialisation, and
# an update rule's learned parameters (rates, a learned optimizer's weights), and an
# encoder the algorithm meta-learns besides the model (MR-MAML).
PARAM_GROUPS = (
    "model",
    "update",
    "encoder",
    "architecture",
    "adjust",  # R2D2's scale, bias (and lambda)
    "scale",  # MetaOptNet's scale
    "fce",  # Matching Networks' context LSTMs
    "relation",  # Relation Networks' relation module
    "classifier",  # the non-episodic baselines' training classifier
)


@dataclass
class GroupConfig:
    """One parameter group of the outer optimizer (``optim.groups.<name>``); null = default."""

    lr: float | None = None  # null: optim.lr
    weight_decay: float | None = None  # null: optim.weight_decay for `model`, else 0
    fresh_state: bool | None = None  # null: optim.fresh_state


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8  # Adam's epsilon (Keras: 1e-7)
    # True: the optimizer's state (Adam's moments, SGD's momentum) is dropped before every
    # step, as when a reference builds a new optimizer each iteration (Yin et al.'s notebook).
    fresh_state: bool = False
    # True: torch's fused implementation, one kernel per step instead of a dozen multi-tensor
    # operations (faster on small models: docs/benchmarks.md); the same update to rounding
    fused: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "none"
    min_lr: float = 0.0
    # cosine: hold the rate for each "epoch" of this many iterations, as MAML++'s code steps
    # its CosineAnnealingLR once per epoch (null: a new rate every iteration)
    epoch_iterations: int | None = None
    step_size: int = 1000
    gamma: float = 0.5
    # multistep: from iteration milestones[k] on, the rate is lr x factors[k] (MetaOptNet's
    # 1, 0.06, 0.012, 0.0024 at epochs 20, 40, 50; RFS's 0.1 and 0.01 at 60 and 80)
    milestones: list[int] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    # Per-group settings, by the algorithm's group names: `model` (the initialisation),
    # `update` (an update rule's learned rates), `encoder` (MR-MAML's), `architecture`
    # (MetaNAS's); each null: the settings above
    groups: dict[str, GroupConfig] = field(
        default_factory=lambda: {name: GroupConfig() for name in PARAM_GROUPS}
    )

    def __post_init__(self) -> None:
        require(self.name in ("adam", "sgd"), "optim", self.name, "choose adam or sgd")
        require(self.lr > 0, "optim.lr", self.lr, "the learning rate must be > 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        require(self.eps > 0, "optim.eps", self.eps, "it must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "it must be >= 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "it must be in [0, 1)")
        require(
            self.scheduler in ("none", "cosine", "linear", "step", "multistep"),
            "optim.scheduler",
            self.scheduler,
            "choose none, cosine, linear, step or multistep",
        )
        require(
            len(self.milestones) == len(self.factors)
            and list(self.milestones) == sorted(set(self.milestones))
            and all(m >= 1 for m in self.milestones)
            and all(f > 0 for f in self.factors),
            "optim.milestones",
            list(self.milestones),
            "increasing iterations >= 1, one positive optim.factors entry each",
        )
        require(
            self.scheduler != "multistep" or bool(self.milestones),
            "optim.milestones",
            list(self.milestones),
            "optim.scheduler=multistep needs milestones (and optim.factors)",
        )
        require(
            0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "it must be in [0, optim.lr]"
        )
        require(self.step_size >= 1, "optim.step_size", self.step_size, "it must be >= 1")
        require(
            self.epoch_iterations is None or self.epoch_iterations >= 1,
            "optim.epoch_iterations",
            self.epoch_iterations,
            "it must be >= 1 or null",
        )
        require(0 < self.gamma <= 1, "optim.gamma", self.gamma, "it must be in (0, 1]")
        for name, group in self.groups.items():
            key = f"optim.groups.{name}"
            require(name in PARAM_GROUPS, key, name, f"the groups are {', '.join(PARAM_GROUPS)}")
            require(
                group.lr is None or group.lr > 0, f"{key}.lr", group.lr, "it must be > 0 or null"
            )
            require(
                group.weight_decay is None or group.weight_decay >= 0,
                f"{key}.weight_decay",
                group.weight_decay,
                "it must be >= 0 or null",
            )


@dataclass
class TrainLoopConfig:
    iterations: int = 5000  # outer (meta) updates
    meta_batch_size: int = 25  # tasks per outer update
    val_every: int = 500  # validate (and checkpoint) every N iterations
    log_every: int = 100  # write a train line to metrics.jsonl every N iterations
    ckpt_every: int | None = None  # write checkpoints/last.pt every N iterations (null: val_every)
    grad_clip: float | None = None  # clip the meta-gradient's norm (null: off)
    # clamp each meta-gradient element to [-c, c] (MAML's and MAML++'s code: 10 on
    # mini-ImageNet; null: off)
    grad_clamp: float | None = None
    on_nan: str = "stop"  # a NaN/Inf meta-loss or meta-gradient: stop, or skip the update
    nan_skips: int = 10  # with on_nan=skip: stop after more than this many in a row

    def __post_init__(self) -> None:
        require(self.on_nan in ("stop", "skip"), "train.on_nan", self.on_nan, "choose stop or skip")
        require_at_least("train.nan_skips", self.nan_skips, 0)
        require_at_least("train.iterations", self.iterations, 0)
        require_at_least("train.meta_batch_size", self.meta_batch_size, 1)
        require_at_least("train.val_every", self.val_every, 1)
        require_at_least("train.log_every", self.log_every, 1)
        require_at_least("train.ckpt_every", self.ckpt_every, 1, null=True)
        require_at_least("train.grad_clip", self.grad_clip, 0, strict=True, null=True)
        require_at_least("train.grad_clamp", self.grad_clamp, 0, strict=True, null=True)


MAX_TASKS = 10_000_000  # val.num_tasks and test.num_tasks


@dataclass
class EvalConfig:
    num_tasks: int = 100  # fixed, seeded tasks (seed and split alone choose them)
    batch_size: int = 100  # tasks adapted at once
    # cross-domain: tasks of this split drawn from another task distribution (e.g. cub),
    # with the training task's ways, shots and queries and the model's input size;
    # task_settings: its other settings; data_root: its files (null: data.root)
    task: str | None = None
    task_settings: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None

    def check(self, section: str) -> None:
        require(self.num_tasks >= 1, f"{section}.num_tasks", self.num_tasks, "it must be >= 1")
        require(
            self.num_tasks <= MAX_TASKS,
            f"{section}.num_tasks",
            self.num_tasks,
            f"it must be at most {MAX_TASKS:,} (a mean over that many tasks is already "
            f"known to a few thousandths of its spread; more only takes time)",
        )
        require(self.batch_size >= 1, f"{section}.batch_size", self.batch_size, "it must be >= 1")


@dataclass
class TestConfig(EvalConfig):
    num_tasks: int = 600
    batch_size: int = 200
    checkpoint: str = "best"  # weights meta-tested after training: best (validation) or last
    report_last: bool = False  # also meta-test the last weights (summary.json: test_last)
    # >= 2: also meta-test the mean prediction of the k best validation checkpoints, kept
    # in checkpoints/top/ (MAML++'s code: 5; summary.json: test_ensemble); 0: off
    ensemble_top_k: int = 0

    def check(self, section: str) -> None:
        super().check(section)
        require(
            self.ensemble_top_k == 0 or self.ensemble_top_k >= 2,
            f"{section}.ensemble_top_k",
            self.ensemble_top_k,
            "it must be 0 (off) or >= 2",
        )
        require(
            self.checkpoint in ("best", "last"),
            "test.checkpoint",
            self.checkpoint,
            "choose best or last",
        )


@dataclass
class PublishedConfig:
    """A paper's number for a preset's setting: ``metacli compare`` shows it next to the
    runs. Not a hyperparameter (never splits rows); ``value`` is null where none exists."""

    value: float | None = None  # the published meta-test metric (the preset's final step)
    ci95: float | None = None  # its 95% confidence half-width, where published
    source: str = ""  # the paper, table or figure, and its reference code
    note: str = ""  # what differs or how it was read (e.g. "read from Fig. 2")


@dataclass
class DataConfig:
    root: str | None = None  # the dataset's folder (null: the METACLI_DATA variable)
    # the decoded-dataset cache (null: METACLI_CACHE, else ~/.cache/metacli)
    cache_dir: str | None = None


OBJECTIVES = ("val", "test")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    # none (metrics.jsonl alone, always written) | tensorboard | mlflow | wandb
    name: str = "none"
    tracking_uri: str | None = None  # mlflow
    experiment: str = "metacli"  # mlflow
    mode: str | None = None  # wandb: offline | online | disabled (null: $WANDB_MODE, else offline)
    project: str = "metacli"  # wandb
    entity: str | None = None  # wandb (null: the logged-in user's)
    group: str | None = None  # wandb: runs shown together (e.g. one sweep's)

    def __post_init__(self) -> None:
        require(
            self.mode is None or self.mode in WANDB_MODES,
            "logger.mode",
            self.mode,
            f"choose {', '.join(WANDB_MODES)}: offline writes <run>/wandb/ for `wandb sync` "
            f"later, online logs to the W&B server",
        )


@dataclass
class DistributedConfig:
    """Meta-training over several processes (metacli.distributed): ranks split the tasks."""

    nproc: int = 1  # processes; under torchrun or a Slurm step, their world size
    backend: str = "auto"  # auto (NCCL for CUDA tensors, gloo for the rest), gloo, nccl
    timeout_s: float = 600.0  # a collective waiting longer ends the run (a rank is gone)

    def __post_init__(self) -> None:
        require(self.nproc >= 1, "distributed.nproc", self.nproc, "it must be >= 1")
        require(
            self.backend in ("auto", "gloo", "nccl"),
            "distributed.backend",
            self.backend,
            "choose one of auto, gloo, nccl",
        )
        require(self.timeout_s > 0, "distributed.timeout_s", self.timeout_s, "it must be > 0")


@dataclass
class RunConfig:
    """The top level: everything but the component groups, which the registry types."""

    seed: int = 0  # fixes everything; 0 is a real seed
    resume: str | None = None  # a run folder to continue in place from checkpoints/last.pt
    ckpt_path: str | None = None  # the checkpoint `metacli test` meta-tests
    # what a run returns to sweepers: val (the best validation metric) or test
    optimized_metric: str = "val"
    # re-running a sweep: skip jobs whose folder holds a finished run of the same config,
    # resume unfinished ones from their last checkpoint
    skip_finished: bool = False
    threads: int | None = None  # torch CPU threads (null: the cores, shared among local jobs)
    name: str | None = None  # a name of the run's, shown and filterable (compare, runs)
    tags: list[str] = field(default_factory=list)  # labels of the run's, likewise
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    val: EvalConfig = field(default_factory=EvalConfig)
    test: TestConfig = field(default_factory=TestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    published: PublishedConfig = field(default_factory=PublishedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        require_seed("seed", self.seed)
        require(
            self.optimized_metric in OBJECTIVES,
            "optimized_metric",
            self.optimized_metric,
            f"choose one of {', '.join(OBJECTIVES)}",
        )
        require_threads("threads", self.threads)
        self.val.check("val")
        self.test.check("test")
        require(
            self.train.meta_batch_size >= self.distributed.nproc,
            "train.meta_batch_size",
            self.train.meta_batch_size,
            f"each of the distributed.nproc={self.distributed.nproc} processes needs at "
            f"least one task of every meta-batch",
        )


COMPONENT_GROUPS = ("algo", "task", "model")


@functools.lru_cache(maxsize=256)
def schema_template(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)``, made once per schema: the merge copies it, and a
    sweep's checks type every job's config."""
    return OmegaConf.structured(schema)


def to_typed(schema: type, node: Any, key: str) -> Any:
    """Check ``node`` against the dataclass ``schema``; return the dataclass instance.

    Unknown keys and wrong types are OmegaConf errors, impossible values come from the
    dataclass's ``__post_init__``; both become a ConfigError naming the full key.
    """
    try:
        merged = OmegaConf.merge(schema_template(schema), node)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = f"{key}.{err.full_key}" if key and err.full_key else (key or err.full_key or "")
        reason = str(err).splitlines()[0].rstrip(".")
        if "is not a ListConfig, list or tuple" in reason:
            reason = f"it takes a list, written in brackets ({where}=[...])"
        if isinstance(err, ConfigKeyError):
            import difflib

            prefix = f"{key}." if key else ""
            known = [
                prefix + k for k in flatten(OmegaConf.to_container(OmegaConf.structured(schema)))
            ]
            near = difflib.get_close_matches(where, known, 1, 0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(
                f"{where} is not a setting{hint}. `metacli train --cfg job` prints every key."
            ) from None
        raise ConfigError(
            f"Invalid setting {where!r}: {reason}. Fix {where} in your overrides "
            f"or config files (see `metacli train --help`)."
        ) from None
    require_finite(typed, key)
    return typed


def check_run_config(cfg: DictConfig) -> RunConfig:
    """Check every section but the component groups; return the typed top level."""
    rest = {
        k: v
        for k, v in OmegaConf.to_container(cfg, resolve=True).items()  # type: ignore[union-attr]
        if k not in COMPONENT_GROUPS
    }
    run: RunConfig = to_typed(RunConfig, rest, "")
    return run


def dataclass_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` -> value (lists as JSON text): comparing runs, hparams."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(node) if isinstance(node, list) else node}


def config_dir() -> Path:
    """conf/ shipped inside the wheel, else the repository's top-level conf/ (editable install)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(
        f"metacli cannot find its configs: neither {package / 'conf'} nor "
        f"{package.parents[1] / 'conf'} holds train.yaml. Reinstall metacli."
    )
