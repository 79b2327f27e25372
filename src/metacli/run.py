"""What `metacli train` and `metacli test` do inside their run folder: build the
components, meta-train (``metacli.loop``), meta-test (``metacli.evaluation``), and record
it all (``metacli.run_folder``). The Hydra job and the Python API both call these."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metacli import distributed, machine
from metacli.build import Resolved, build, resolve
from metacli.checkpoint import (
    NO_CHECKPOINT,
    LoopState,
    load_checkpoint,
    load_weights,
    make,
    restore,
    resumable,
)
from metacli.console import print_summary
from metacli.errors import ConfigError
from metacli.evaluation import EvalSummary, meta_test, meta_test_ensemble
from metacli.files import read_json
from metacli.models.base import Model
from metacli.run_folder import RunFolder, config_of
from metacli.signals import STOPPER

log = logging.getLogger("metacli")
JOBS = [0]  # jobs begun in this process: a sweep's jobs after the first start warm


def startup_of(begun: float) -> float | None:
    """Seconds from the job's start to its first iteration: from the process's start
    (imports included) for the first job of a process, from the job's own for the others."""
    JOBS[0] += 1
    return process_age() if JOBS[0] == 1 else time.perf_counter() - begun


def objective(summary: dict[str, Any], which: str) -> float:
    """What a run returns to sweepers: NaN unless it finished (Optuna: a failed trial)."""
    if summary.get("status") != "finished":
        return math.nan
    test = (summary.get("test") or {}).get("mean")
    value = test if which == "test" else (summary.get("best_val") or {}).get("metric")
    value = test if value is None else value  # no validation ran
    return math.nan if value is None else float(value)


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): the time from
    the command to the first iteration, imports included, is what a user waits."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime, field 22
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def set_threads(cfg: DictConfig, hydra: Any, model: Model) -> tuple[int, str]:
    """Torch CPU threads and why: ``threads`` (or ``device.threads``), else chosen for the
    work and the machine (``metacli.machine``) within the cores a launcher gives each job
    (``hydra``: Hydra's node, with the launcher's settings; None outside Hydra).

    Parallel local jobs each taking every core would oversubscribe the CPU, so the cores
    are divided by joblib's n_jobs, or set from submitit's cpus_per_task / Ray's num_cpus.
    """
    import torch

    threads = cfg.get("threads") or OmegaConf.select(cfg, "device.threads", default=None)
    if threads:
        torch.set_num_threads(int(threads))
        cores = machine.affinity_cores()
        if int(threads) <= cores:
            return torch.get_num_threads(), f"{threads}: set by threads"
        log.warning(
            f"threads={threads} is more than the {cores} cores this process may use: torch's "
            f"threads wait for one another's cores, which slows every operation "
            f"(docs/threads.md). threads=null chooses for this machine and this work."
        )
        return torch.get_num_threads(), f"{threads}: set by threads, more than the {cores} cores"
    share = machine.affinity_cores()
    launcher = hydra.launcher if hydra is not None else OmegaConf.create()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks sharing this machine
    ray = OmegaConf.select(launcher, "ray.remote.num_cpus", default=None)
    n_jobs = launcher.get("n_jobs")
    if launcher.get("cpus_per_task") or ray:
        share = int(launcher.get("cpus_per_task") or ray)
    elif n_jobs:
        jobs = n_jobs if n_jobs > 0 else max(1, share + 1 + n_jobs)  # joblib: -1 = all
        share = max(1, share // jobs)
    elif distributed.WORLD.active and local > 1:
        share = max(1, share // local)
    threads, why = machine.choose(share, model.few_threads())
    torch.set_num_threads(threads)
    return torch.get_num_threads(), why


def report(
    title: str, result: EvalSummary, seconds: float, folder: RunFolder, extra: list[tuple[str, str]]
) -> None:
    if not folder.writer:  # a distributed run: rank 0 prints it
        return
    steps = len(result.metric_mean) - 1
    first = "before adaptation (0 steps)" if steps else "no inner steps"  # (ProtoNets)
    rows = [(first, result.metric_mean[0], result.metric_ci95[0])]
    if steps:
        label = f"after {steps} inner step{'s' * (steps != 1)}"
        rows.append((label, result.final, result.metric_ci95[-1]))
    if result.diverged:  # the table's means leave them out (all of them: nan)
        left_out = f"{result.diverged} of {result.num_tasks}, left out of the means"
        extra = [("diverged tasks", left_out), *extra]
    print_summary(
        f"{title}: {result.num_tasks} tasks",
        result.metric_name,
        rows,
        [*extra, ("time", f"{seconds:.1f} s"), ("run folder", str(folder.root))],
    )


def train(
    cfg: DictConfig, folder: RunFolder | None = None, resolved: Resolved | None = None
) -> float:
    """Meta-train, then meta-test; returns ``optimized_metric`` (for sweepers; NaN if failed).

    ``folder``: where (the Hydra job's folder unless given); ``resolved``: ``cfg`` already
    resolved (by the checks before Hydra started), else it is resolved here, once.
    """
    from metacli.loggers import make_sinks
    from metacli.loop import meta_train

    start = time.perf_counter()
    distributed.join(cfg)
    folder = folder or RunFolder.current("train", cfg)
    with STOPPER.installed(), folder.guard(), distributed.leaving():
        folder.claim()
        resolved = resolved or resolve(cfg)
        config = config_of(resolved.effective)
        previous = None if cfg.resume else folder.previous_run(bool(cfg.skip_finished), config)
        if previous == "finished":
            summary = read_json(folder.summary_path) or {}
            log.info("skip_finished: %s already holds a finished run of this config", folder.root)
            folder.discard()
            return objective(summary, cfg.optimized_metric)
        components = build(resolved, folder.overrides)
        threads, threads_why = set_threads(cfg, folder.hydra, components.model)
        state = LoopState()
        resuming = bool(cfg.resume) or previous == "resumable"
        if resuming:
            last = resumable(folder.root) or folder.checkpoints / "last.pt"
            state = restore(components, load_checkpoint(last), str(last))
            if last.name != "last.pt":
                log.warning(
                    "%s has no checkpoints/last.pt: resuming from %s (iteration %d)",
                    folder.root,
                    last.name,
                    state.iteration,
                )
            earlier = read_json(folder.summary_path) or {}
            folder.resumes(earlier, state)
        elif previous == "replace":
            folder.archive()
        folder.start(
            components.cfg,
            device=str(components.device),
            threads=threads,
            threads_chosen=threads_why,
            batching=components.algorithm.batching,  # what algo.batching=auto resolved to
            classes=components.classes(),
            **distributed.described(),
        )
        for name, text in components.model.carried().items():
            folder.write_text(name, text)
        if resuming:
            folder.rewind_metrics(state.iteration)
            folder.update_summary(resumed_from_iteration=state.iteration)
            log.info("Resuming %s from iteration %d", folder.root, state.iteration)
        folder.sinks = make_sinks(components.cfg, folder.root)
        log.info(
            "Meta-training %s on %s with %s (%d meta-parameters) on %s for %d iterations",
            cfg.algo.name,
            cfg.task.name,
            cfg.model.name,
            sum(p.numel() for p in components.algorithm.parameters()),
            components.device,
            cfg.train.iterations,
        )
        startup = startup_of(start)
        state = meta_train(components, folder, state)
        testing = time.perf_counter()
        distributed.barrier()  # rank 0's checkpoints are on disk: every rank reads them
        if not (folder.checkpoints / "last.pt").exists():
            folder.save_checkpoint("last", make(components, state))
        source = components.run.test.checkpoint
        best = folder.checkpoints / "best.pt"
        extra: dict[str, Any] = {}
        if components.run.test.report_last and source == "best" and best.exists():
            # the last weights are in memory: meta-test them first, then the best ones
            final = meta_test(components, folder, state.iteration, split="test_last")
            extra["test_last"] = {**final.as_dict(), "checkpoint_iteration": state.iteration}
        if source == "best" and best.exists():
            load_weights(components, load_checkpoint(best), str(best))
        result = meta_test(components, folder, state.iteration)
        ensemble = meta_test_ensemble(components, folder, state, folder.checkpoints)
        if ensemble is not None:
            extra["test_ensemble"] = ensemble
        now = time.perf_counter()
        seconds, tested = now - start, now - testing  # this session's
        training = state.wall_time - state.eval_time
        executor = components.algorithm.executor
        compiled: dict[str, Any] = {}
        if executor.compile:  # this session's compile time, apart from the iterations'
            compiled = {"compile_s": executor.compile_seconds}
            if executor.fallback is not None:
                compiled["compile_fallback"] = executor.fallback
        folder.finish(
            "finished",
            iterations=state.iteration,
            startup_s=startup,
            **compiled,
            # over every session: the iterations alone, the validations and meta-tests
            train_time_s=training,
            eval_time_s=folder.earlier_eval_time + state.eval_time + tested,
            it_per_s=state.iteration / training if training > 0 else None,
            # the task distribution each split's tasks came from (cross-domain: not one)
            tasks={s: components.task_for(s).cfg.name for s in ("train", "val", "test")},
            best_val={
                "metric": state.best_metric,
                "iteration": state.best_iteration,
                **({"diverged_tasks": state.best_diverged} if state.best_diverged else {}),
            },
            test={
                **result.as_dict(),
                "checkpoint": source if best.exists() else "last",
                "checkpoint_iteration": state.best_iteration
                if source == "best" and best.exists()
                else state.iteration,
            },
            **extra,
        )
        folder.update_summary(objective=objective(folder.summary, cfg.optimized_metric))
        tested_on = components.task_for("test").cfg.name
        domains = cfg.task.name if tested_on == cfg.task.name else f"{cfg.task.name} -> {tested_on}"
        lines = [("algorithm", f"{cfg.algo.name} on {domains} ({cfg.model.name})")]
        if ensemble is not None:
            members = len(ensemble["checkpoint_iterations"])
            value = f"{ensemble['mean']:.4f} ± {ensemble['ci95']:.4f}"
            lines.append((f"mean of the {members} best checkpoints", value))
        report("meta-test", result, seconds, folder, lines)
    return objective(folder.summary, cfg.optimized_metric)


def test(
    cfg: DictConfig, folder: RunFolder | None = None, resolved: Resolved | None = None
) -> float:
    """Meta-test a checkpoint on the fixed test tasks, in a run folder of its own
    (``folder`` and ``resolved`` as for ``train``)."""
    start = time.perf_counter()
    distributed.join(cfg)
    folder = folder or RunFolder.current("test", cfg)
    with STOPPER.installed(), folder.guard(), distributed.leaving():
        folder.claim()
        resolved = resolved or resolve(cfg)
        previous = folder.previous_run(bool(cfg.skip_finished), config_of(resolved.effective))
        if not cfg.ckpt_path:
            raise ConfigError(NO_CHECKPOINT)
        components = build(resolved, folder.overrides)
        threads, threads_why = set_threads(cfg, folder.hydra, components.model)
        checkpoint = load_checkpoint(cfg.ckpt_path)
        load_weights(components, checkpoint, str(cfg.ckpt_path), resolved.effective)
        if previous is not None:
            folder.archive()
        folder.start(
            components.cfg,
            device=str(components.device),
            threads=threads,
            threads_chosen=threads_why,
            checkpoint=str(cfg.ckpt_path),
            classes=components.classes(),
            **distributed.described(),
        )
        for name, text in components.model.carried().items():
            folder.write_text(name, text)
        testing = time.perf_counter()
        result = meta_test(components, folder, checkpoint["iteration"])
        now = time.perf_counter()
        seconds, tested = now - start, now - testing
        folder.finish(
            "finished",
            iterations=checkpoint["iteration"],
            eval_time_s=tested,
            test={
                **result.as_dict(),
                "checkpoint": str(cfg.ckpt_path),
                "checkpoint_iteration": checkpoint["iteration"],
            },
        )
        report(
            "meta-test",
            result,
            seconds,
            folder,
            [("checkpoint", f"{cfg.ckpt_path} (iteration {checkpoint['iteration']})")],
        )
    return objective(folder.summary, "test")


COMMANDS = {"train": train, "test": test}
