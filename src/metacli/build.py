"""The one place components are built from a composed config.

``resolve`` checks every section against its schema and lets the algorithm adjust the
settings it needs (``configure``), without building anything: its ``effective`` config
is what runs, and what summary.json and the checkpoints record. ``build`` then creates
the task, model, algorithm, outer optimizer and scheduler from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metacli import distributed
from metacli.algorithms.base import MetaAlgorithm
from metacli.config import (
    DeviceConfig,
    GroupConfig,
    OptimConfig,
    RunConfig,
    check_run_config,
    to_typed,
)
from metacli.errors import ConfigError, MetacliError
from metacli.models.base import Model
from metacli.optim import OuterAdam, OuterSGD
from metacli.options import class_of, option_keys, schema_of
from metacli.registry import lookup
from metacli.tasks.base import TaskDistribution, split_generator

log = logging.getLogger(__name__)
# The component sections, in the order they are checked (the first problem is reported).
COMPONENT_GROUPS = ("task", "model", "algo")


@dataclass
class Components:
    cfg: DictConfig  # the effective config: saved in summary.json and every checkpoint
    run: RunConfig  # its typed top-level sections
    task: TaskDistribution
    model: Model
    algorithm: MetaAlgorithm  # holds the model; its parameters are the meta-parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    train_generator: torch.Generator  # the training task stream (checkpointed)
    overrides: list[str] = field(default_factory=list)  # the command line's, for checkpoints
    # cross-domain: the distribution that val or test tasks come from, where not ``task``
    eval_tasks: dict[str, TaskDistribution] = field(default_factory=dict)

    def task_for(self, split: str) -> TaskDistribution:
        """The task distribution that ``split``'s tasks are drawn from."""
        return self.eval_tasks.get(split, self.task)

    def classes(self) -> dict[str, str]:
        """The import path of each component's class (summary.json: what ran)."""
        parts: dict[str, Any] = {"algo": self.algorithm, "task": self.task, "model": self.model}
        rule = getattr(self.algorithm, "rule", None)
        if rule is not None:
            parts["update"] = rule
        return {group: import_path(type(part)) for group, part in parts.items()}


@dataclass
class Resolved:
    """A config checked section by section, with the algorithm's adjustments applied."""

    run: RunConfig
    classes: dict[str, Any]  # group -> registered class
    typed: dict[str, Any]  # group -> its config dataclass
    notes: list[str]  # what `configure` changed
    effective: DictConfig
    # cross-domain (val.task, test.task): split -> (class, config) of its distribution
    eval_tasks: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def typed_group(cfg: DictConfig, group: str) -> tuple[Any, Any]:
    """The class of a component group's option and its section checked against its schema.

    The class is the one ``_target_`` names (a config file of the user's), else the one
    registered under the section's ``name`` (``metacli.registry``).
    """
    node = cfg.get(group)
    if node is None or node.get("name") is None:
        raise ConfigError(
            f"The config has no {group}.name. Select a {group} with {group}=<option>."
        )
    cls = class_of(group, node)
    node = OmegaConf.masked_copy(node, [str(k) for k in node if k != "_target_"])
    schema = schema_of(group, cls, node)
    own = {f.name for f in dataclasses.fields(schema)}
    extra = [k for k in node if k not in own]
    known = set().union(*option_keys(group).values()) if extra else set()
    foreign = [k for k in extra if k in known]
    if foreign:  # e.g. ++algo.inner_lr=0.1,0.4 in a sweep that includes algo=protonet
        log.warning(
            "%s does not apply to %s=%s; ignored",
            ", ".join(f"{group}.{k}" for k in foreign),
            group,
            node.name,
        )
        node = OmegaConf.masked_copy(node, [str(k) for k in node if k not in foreign])
    return cls, to_typed(schema, node, group)


def import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def section(group: str, cls: type, typed: Any) -> dict[str, Any]:
    """A component's section of the effective config; a class that its name does not find
    (a config file's ``_target_``, a plug-in) is recorded with its import path, so that a
    checkpoint rebuilds it."""
    values = dataclasses.asdict(typed)
    if not cls.__module__.startswith("metacli.") or getattr(cls, "key", None) != values["name"]:
        values["_target_"] = import_path(cls)
    return values


def resolve(cfg: DictConfig) -> Resolved:
    """Check the whole config and apply ``configure``; builds nothing."""
    run = check_run_config(cfg)
    classes, typed = {}, {}
    for group in COMPONENT_GROUPS:
        classes[group], typed[group] = typed_group(cfg, group)
    task_cfg, algo_cls, algo_cfg = typed["task"], classes["algo"], typed["algo"]
    test_ways = getattr(task_cfg, "test_ways", None)
    if algo_cls.uses_head and test_ways not in (None, getattr(task_cfg, "ways", None)):
        raise ConfigError(
            f"task.test_ways={test_ways} differs from task.ways, but algo={algo_cfg.name} "
            f"adapts a {task_cfg.ways}-way linear head. Set task.test_ways=null, or use an "
            f"algorithm without a head (algo=protonet)."
        )
    check_model_inputs(classes, typed)
    eval_tasks = {
        split: evaluation_task(split, getattr(run, split), classes["task"], task_cfg)
        for split in ("val", "test")
        if getattr(run, split).task is not None
    }
    notes = algo_cls.configure(algo_cfg, typed["model"], run)
    sections = {
        **dataclasses.asdict(run),
        **{g: section(g, classes[g], typed[g]) for g in COMPONENT_GROUPS},
    }
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    effective = OmegaConf.create({k: sections.get(str(k), v) for k, v in container.items()})
    return Resolved(run, classes, typed, notes, effective, eval_tasks)


# the episode settings an evaluation task takes from the training task
EPISODE_FIELDS = ("ways", "shots", "queries", "test_ways", "test_shots", "test_queries", "labels")


def evaluation_task(split: str, section: Any, task_cls: Any, task_cfg: Any) -> tuple[Any, Any]:
    """The class and config of ``{split}.task`` (cross-domain validation or meta-test): its
    own defaults, the training task's episode settings, the training images' size and
    channels, then ``{split}.task_settings``; its inputs must have the model's shape."""
    cls = lookup("task", str(section.task), TaskDistribution)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    values: dict[str, Any] = {
        f: getattr(task_cfg, f) for f in EPISODE_FIELDS if f in own and hasattr(task_cfg, f)
    }
    for field_name in ("ways", "shots", "queries"):  # it serves evaluation episodes alone
        test_value = values.pop(f"test_{field_name}", None)
        if test_value is not None:
            values[field_name] = test_value
    shape = task_cls.shape_of(task_cfg)
    if shape is not None and len(shape) == 3:
        values.update(
            {k: v for k, v in (("channels", shape[0]), ("image_size", shape[-1])) if k in own}
        )
    settings = dict(section.task_settings)
    unknown = sorted(set(settings) - own)
    if unknown:
        raise ConfigError(
            f"{split}.task_settings.{unknown[0]} is not a setting of task={section.task} (its "
            f"settings: {', '.join(sorted(own - {'name'}))})."
        )
    values.update(settings)
    values["name"] = cls.key if getattr(cls, "key", None) else str(section.task)
    try:
        cfg = cls.Config(**values)
    except ConfigError as err:
        raise ConfigError(f"{split}.task={section.task}: {err}") from None
    theirs = cls.shape_of(cfg)
    if shape is not None and theirs is not None and tuple(theirs) != tuple(shape):
        raise ConfigError(
            f"{split}.task={section.task} gives inputs of shape {tuple(theirs)}, but the model "
            f"takes {tuple(shape)} (task={task_cfg.name}). Set {split}.task_settings (its "
            f"image_size or channels) to match, or choose another {split}.task."
        )
    if not (cls.is_classification and task_cls.is_classification) and cls is not task_cls:
        raise ConfigError(
            f"{split}.task={section.task} and task={task_cfg.name} are not both "
            f"classification tasks: a model trained on one cannot be scored on the other."
        )
    return cls, cfg


def check_model_inputs(classes: dict[str, Any], typed: dict[str, Any]) -> None:
    """An image model behind an algorithm that hands it vectors (MR-MAML's encoder): say
    so, rather than the task's inputs (which are images)."""
    task_shape = classes["task"].shape_of(typed["task"])
    if classes["model"].inputs != "images" or task_shape is None or len(task_shape) != 3:
        return
    algo = typed["algo"]
    shape = tuple(classes["algo"].model_input_shape(algo, tuple(task_shape)))
    if len(shape) != 3:
        model = typed["model"].name
        raise ConfigError(
            f"algo={algo.name} encodes each image into a vector of shape {shape} before the "
            f"model, but model={model} takes images [channels, height, width]. Choose "
            f"model=mlp with algo={algo.name}, or another algorithm for model={model}."
        )


def check(cfg: DictConfig) -> None:
    """Validate the whole config without building anything."""
    resolve(cfg)


def resolve_device(cfg: DeviceConfig) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cfg.name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (cfg.name == "cuda" and not cuda) or (cfg.name == "mps" and not mps):
        raise ConfigError(
            f"device={cfg.name} was requested, but this PyTorch ({torch.__version__}) "
            f"finds no {cfg.name.upper()} device on this machine. Use device=cpu, or "
            f"device=auto to take the best device present."
        )
    return torch.device(cfg.name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def optimizer_groups(cfg: OptimConfig, groups: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """torch parameter groups: each of the algorithm's groups with its lr and weight decay.

    Only the initialisation (``model``) takes ``optim.weight_decay`` by default: decaying
    learned rates or architecture weights toward zero is rarely meant.
    """
    unused = [name for name, g in cfg.groups.items() if name not in groups and g != GroupConfig()]
    if unused:
        log.warning("optim.groups.%s: this algorithm has no such parameters; ignored", unused[0])
    out = []
    for name, params in groups.items():
        own = cfg.groups.get(name, GroupConfig())
        decay = cfg.weight_decay if name == "model" else 0.0
        out.append(
            {
                "name": name,
                "params": params,
                "lr": cfg.lr if own.lr is None else own.lr,
                "weight_decay": decay if own.weight_decay is None else own.weight_decay,
                "fresh_state": cfg.fresh_state if own.fresh_state is None else own.fresh_state,
            }
        )
    return out


def make_optimizer(cfg: OptimConfig, groups: dict[str, list[Any]]) -> torch.optim.Optimizer:
    params = optimizer_groups(cfg, groups)
    # On a CPU torch defaults to a Python loop over the tensors; its multi-tensor
    # (foreach) implementation gives the same numbers bit for bit in a few operations per
    # step instead of a few per tensor. Elsewhere torch's default stands.
    # optim.fused asks for torch's fused kernels instead.
    on_cpu = all(p.device.type == "cpu" for g in params for p in g["params"])
    kernels = {"fused": True} if cfg.fused else {"foreach": True if on_cpu else None}
    if cfg.name == "adam":
        betas = (cfg.betas[0], cfg.betas[1])
        return OuterAdam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, **kernels)
    return OuterSGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)


def make_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, iterations: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "cosine" and cfg.epoch_iterations is not None:
        # MAML++'s code: CosineAnnealingLR(T_max=epochs, eta_min).step(epoch) each iteration
        epoch, epochs = cfg.epoch_iterations, max(math.ceil(iterations / cfg.epoch_iterations), 1)
        floor = cfg.min_lr / cfg.lr

        def factor(it: int) -> float:
            return floor + (1 - floor) * (1 + math.cos(math.pi * (it // epoch) / epochs)) / 2

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(iterations, 1), eta_min=cfg.min_lr
        )
    if cfg.scheduler == "linear":  # to min_lr at the last iteration (Reptile's annealing)
        return torch.optim.lr_scheduler.LinearLR(
            optimizer,
            start_factor=1.0,
            end_factor=cfg.min_lr / cfg.lr,
            total_iters=max(iterations, 1),
        )
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "multistep":  # the rate times factors[k] from milestones[k] on
        milestones, factors = list(cfg.milestones), list(cfg.factors)

        def stepped(it: int) -> float:
            passed = sum(it >= m for m in milestones)
            return 1.0 if passed == 0 else factors[passed - 1]

        return torch.optim.lr_scheduler.LambdaLR(optimizer, stepped)
    return None


def check_stacked(cfg: Any, algorithm: MetaAlgorithm) -> None:
    """``algo.batching=stacked`` asked for where training cannot stack: say what it needs."""
    if cfg.batching != "stacked" or algorithm.stacks():
        return
    model = algorithm.model.cfg.name
    update = getattr(cfg, "update", "-")
    raise ConfigError(
        f"algo.batching=stacked computes a meta-batch as one stack of tasks with its "
        f"meta-gradient written out (metacli/engine/stacked_meta_gradient.py). It "
        f"serves maml, fomaml, anil and metasgd with algo.update=sgd or metasgd, without "
        f"algo.inner_batch, on model=mlp (model.written_backward=true) with a regression "
        f"or classification task; this run has algo={cfg.name}, algo.update={update}, "
        f"model={model}. Use algo.batching=auto (it stacks where it can)."
    )


def build(config: DictConfig | Resolved, overrides: list[str] | None = None) -> Components:
    """The components of a composed config (resolved here) or of one ``resolve`` made."""
    resolved = config if isinstance(config, Resolved) else resolve(config)
    run, classes, typed = resolved.run, resolved.classes, resolved.typed
    for note in resolved.notes:
        log.info("%s", note)
    device = resolve_device(run.device)
    if device.type == "cuda" and distributed.WORLD.active:  # a GPU per rank of this machine
        device = torch.device("cuda", distributed.WORLD.local_rank % torch.cuda.device_count())
    if run.device.threads is not None:
        torch.set_num_threads(run.device.threads)
    seed_everything(run.seed)
    data_root = run.data.root or os.environ.get("METACLI_DATA")
    task = classes["task"](typed["task"], data_root, run.data.cache_dir)
    eval_tasks = {}
    for split, (cls, cfg) in resolved.eval_tasks.items():
        section = getattr(run, split)
        try:
            eval_tasks[split] = cls(cfg, section.data_root or data_root, run.data.cache_dir)
        except MetacliError as err:  # its files are {split}.data_root's: say that setting
            told = str(err).replace("data.root", f"{split}.data_root")
            raise MetacliError(f"{split}.task={section.task}: {told}") from None
    output_dim = task.output_dim if classes["algo"].uses_head else None
    input_shape = classes["algo"].model_input_shape(typed["algo"], tuple(task.input_shape))
    model = classes["model"](typed["model"], input_shape, output_dim)
    algorithm = classes["algo"](typed["algo"], model, task).to(device)
    check_stacked(typed["algo"], algorithm)
    optimizer = make_optimizer(run.optim, algorithm.param_groups())
    scheduler = make_scheduler(run.optim, optimizer, run.train.iterations)
    return Components(
        cfg=resolved.effective,
        run=run,
        task=task,
        model=model,
        algorithm=algorithm,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        train_generator=split_generator(run.seed, "train"),
        overrides=list(overrides or []),
        eval_tasks=eval_tasks,
    )
