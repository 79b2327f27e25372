"""The one place components are built from a composed config."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metacli.algorithms.base import MetaAlgorithm
from metacli.cli import option_keys
from metacli.config import DeviceConfig, OptimConfig, RunConfig, check_run_config, to_typed
from metacli.errors import ConfigError
from metacli.models.base import Model
from metacli.registry import Registered, lookup
from metacli.tasks.base import TaskDistribution, split_generator

log = logging.getLogger(__name__)


@dataclass
class Components:
    cfg: DictConfig  # the composed config, saved in every checkpoint
    run: RunConfig  # its typed top-level sections
    task: TaskDistribution
    model: Model
    algorithm: MetaAlgorithm  # holds the model; its parameters are the meta-parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    train_generator: torch.Generator  # the training task stream (checkpointed)


def typed_group(cfg: DictConfig, group: str, base: type[Registered]) -> tuple[Any, Any]:
    """The registered class of a component group and its config checked against its schema."""
    node = cfg.get(group)
    if node is None or node.get("name") is None:
        raise ConfigError(
            f"The config has no {group}.name. Select a {group} with {group}=<option>."
        )
    cls: Any = lookup(group, str(node.name), base)
    own = {f.name for f in dataclasses.fields(cls.Config)}
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
        node = OmegaConf.masked_copy(node, [k for k in node if k not in foreign])
    return cls, to_typed(cls.Config, node, group)


def check(cfg: DictConfig) -> None:
    """Validate the whole config without building anything."""
    check_run_config(cfg)
    typed_group(cfg, "task", TaskDistribution)
    typed_group(cfg, "model", Model)
    typed_group(cfg, "algo", MetaAlgorithm)


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


def make_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def make_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, iterations: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
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
    return None


def build(cfg: DictConfig) -> Components:
    run = check_run_config(cfg)
    task_cls, task_cfg = typed_group(cfg, "task", TaskDistribution)
    model_cls, model_cfg = typed_group(cfg, "model", Model)
    algo_cls, algo_cfg = typed_group(cfg, "algo", MetaAlgorithm)
    test_ways = getattr(task_cfg, "test_ways", None)
    if algo_cls.uses_head and test_ways not in (None, getattr(task_cfg, "ways", None)):
        raise ConfigError(
            f"task.test_ways={test_ways} differs from task.ways, but algo={algo_cfg.name} "
            f"adapts a {task_cfg.ways}-way linear head. Set task.test_ways=null, or use an "
            f"algorithm without a head (algo=protonet)."
        )
    for note in algo_cls.configure(algo_cfg, model_cfg, run):
        log.info("%s", note)
    device = resolve_device(run.device)
    if run.device.threads is not None:
        torch.set_num_threads(run.device.threads)
    seed_everything(run.seed)
    data_root = run.data.root or os.environ.get("METACLI_DATA")
    task = task_cls(task_cfg, data_root, run.data.cache_dir)
    output_dim = task.output_dim if algo_cls.uses_head else None
    model = model_cls(model_cfg, task.input_shape, output_dim)
    algorithm = algo_cls(algo_cfg, model, task).to(device)
    optimizer = make_optimizer(run.optim, algorithm.parameters())
    scheduler = make_scheduler(run.optim, optimizer, run.train.iterations)
    return Components(
        cfg=cfg,
        run=run,
        task=task,
        model=model,
        algorithm=algorithm,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        train_generator=split_generator(run.seed, "train"),
    )
