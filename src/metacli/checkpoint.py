"""The checkpoint: one dict holding everything needed to continue a run bit for bit.

This module alone decides what a checkpoint contains (``make``), how it is read
(``load_checkpoint``, with the migration of older formats) and how it is put back
(``restore``, ``load_weights``). It is written atomically (``metacli.files``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from metacli import __version__
from metacli.config import flatten
from metacli.errors import MetacliError
from metacli.files import save_tensors

if TYPE_CHECKING:
    from metacli.build import Components

# 2: learned inner rates moved into the update rule (`rule.learning_rates.*`) and the
# outer optimizer got one parameter group per group of meta-parameters.
FORMAT_VERSION = 2

# `metacli test` without ckpt_path (said by the checks, and by a run started from the API)
NO_CHECKPOINT = (
    "No checkpoint to meta-test: add ckpt_path=<run folder>/checkpoints/best.pt (or last.pt)."
)


@dataclass
class LoopState:
    """The training loop's own progress, saved with the weights."""

    iteration: int = 0  # outer updates done
    best_metric: float | None = None  # over the best validation's finite tasks
    best_iteration: int | None = None
    best_diverged: int | None = None  # its diverged tasks (None: no validation yet)
    wall_time: float = 0.0  # seconds spent training, summed over resumed sessions
    eval_time: float = 0.0  # of which in validations
    # [validation metric, iteration] of the checkpoints kept in checkpoints/top/
    # (test.ensemble_top_k), in iteration order
    top: list[list[float]] = field(default_factory=list)
    # the train line being summed (``Window.snapshot``: count and sums), so that a resumed
    # run logs the same lines as an uninterrupted one; and the skipped non-finite updates
    window: dict[str, Any] = field(default_factory=dict)
    nan_skipped: int = 0
    nan_in_a_row: int = 0


def make(components: Components, state: LoopState) -> dict[str, Any]:
    return {
        "format": "metacli",
        "format_version": FORMAT_VERSION,
        "metacli_version": __version__,
        "torch_version": str(torch.__version__),
        "iteration": state.iteration,
        "best_metric": state.best_metric,
        "best_iteration": state.best_iteration,
        "best_diverged": state.best_diverged,
        "wall_time": state.wall_time,
        "eval_time": state.eval_time,
        "top": [list(entry) for entry in state.top],
        "window": state.window,
        "nan_skipped": state.nan_skipped,
        "nan_in_a_row": state.nan_in_a_row,
        "algorithm": components.algorithm.state_dict(),
        "optimizer": components.optimizer.state_dict(),
        "scheduler": components.scheduler.state_dict()
        if components.scheduler is not None
        else None,
        "rng": capture_rng(components.train_generator),
        "config": OmegaConf.to_container(components.cfg, resolve=True),  # the effective config
        "overrides": list(components.overrides),
    }


def resumable(run_folder: Path) -> Path | None:
    """The checkpoint a run continues from: ``last.pt``, else ``best.pt`` (a run whose
    first ``last.pt`` could not be written: both hold the whole state), else None."""
    for name in ("last.pt", "best.pt"):
        path = run_folder / "checkpoints" / name
        if path.is_file():
            return path
    return None


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    save_tensors(path, checkpoint)


def sweep_jobs_in(folder: Path) -> list[Path]:
    """The job folders of a sweep's folder (its numbered folders with checkpoints)."""
    if not folder.is_dir() or (folder / "checkpoints").is_dir():
        return []
    jobs = [p for p in folder.iterdir() if p.name.isdigit() and (p / "checkpoints").is_dir()]
    return sorted(jobs, key=lambda p: int(p.name))


def tested_run(folder: Path) -> Path | None:
    """The training run that a meta-test's folder (``metacli test``) tested."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    checkpoint = summary.get("checkpoint") if summary.get("command") == "test" else None
    return Path(checkpoint).parent.parent if checkpoint else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``: a checkpoint never runs code."""
    path = Path(path)
    jobs = sweep_jobs_in(path)
    if jobs:
        raise MetacliError(
            f"{path} is a sweep's folder: give the checkpoint of one of its jobs, e.g. "
            f"ckpt_path={jobs[0]}/checkpoints/best.pt ({len(jobs)} jobs there)."
        )
    saved = sorted(p.name for p in (path / "checkpoints").glob("*.pt")) if path.is_dir() else []
    if saved:
        raise MetacliError(
            f"{path} is a run folder: give one of its checkpoints, ckpt_path={path}/"
            f"checkpoints/{'best.pt' if 'best.pt' in saved else saved[0]} (it has "
            f"{', '.join(saved)})."
        )
    if not path.is_file():
        raise MetacliError(
            f"No checkpoint at {path}. Set ckpt_path (or resume) to an existing "
            f"file, e.g. outputs/train/<date>/<time>/checkpoints/best.pt."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        if "Unsupported global" in str(err):  # torch's advice to unpickle it: never
            raise MetacliError(
                f"{path} holds Python objects besides tensors, which metacli never loads: a "
                f"checkpoint is read with weights_only=True so that no file can run code. "
                f"Use a checkpoint written by metacli (checkpoints/best.pt or last.pt)."
            ) from None
        raise MetacliError(
            f"Cannot read the checkpoint {path}: it is truncated or not a PyTorch file "
            f"({type(err).__name__}). Use another checkpoint (checkpoints/best.pt or last.pt)."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "metacli":
        raise MetacliError(f"{path} is not a metacli checkpoint (no 'format': 'metacli' entry).")
    version = checkpoint.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise MetacliError(
            f"{path} was written by a newer metacli (checkpoint format {version}; this one "
            f"reads up to {FORMAT_VERSION}). Upgrade metacli to use it."
        )
    if version == 1:
        migrate_v1(checkpoint)
    return checkpoint


def migrate_v1(checkpoint: dict[str, Any]) -> None:
    """Format 1 -> 2: Meta-SGD's ``learning_rates.*`` and MAML++'s ``step_lrs.*`` are now the
    update rule's ``rule.learning_rates.*``; MAML++'s ``learn_inner_lr`` is ``update``."""
    algo = (checkpoint.get("config") or {}).get("algo") or {}
    if "learn_inner_lr" in algo:
        algo["update"] = "lslr" if algo.pop("learn_inner_lr") else "sgd"
    renamed = {}
    for key, value in (checkpoint.get("algorithm") or {}).items():
        for old in ("learning_rates.", "step_lrs."):
            if key.startswith(old):
                key = "rule.learning_rates." + key[len(old) :]
        renamed[key] = value
    if "algorithm" in checkpoint:
        checkpoint["algorithm"] = renamed


def load_weights(
    components: Components, checkpoint: dict[str, Any], source: str, now: Any = None
) -> None:
    """The algorithm's weights from ``checkpoint``; ``now``: the config they are loaded into
    (its algo, model and task settings that differ from the checkpoint's are named)."""
    try:
        components.algorithm.load_state_dict(checkpoint["algorithm"])
    except RuntimeError as err:
        # PyTorch's lines after its first say what differs: missing, unexpected, or
        # other shapes (size mismatch for head.weight: ... [5, 64] ... [20, 64])
        lines = [line.strip().rstrip(".") for line in str(err).splitlines()[1:] if line.strip()]
        found = "; ".join(lines) or str(err).splitlines()[0]
        if len(found) > 300:
            found = found[:300].rsplit(" ", 1)[0] + " ..."
        changed = changed_components(checkpoint.get("config"), now)
        raise MetacliError(
            f"The checkpoint {source} does not fit the configured algo/model"
            + (f": its run had {changed}" if changed else "")
            + f" (PyTorch: {found}). Use the same algo, model and task settings (task.ways "
            "sets the head) as the run that wrote it."
        ) from None


def changed_components(before: Any, now: Any) -> str:
    """How the algo, model and task settings of ``now`` differ from ``before`` (the
    checkpoint's config): ``task=sinusoid (now synthetic)`` where the option differs,
    else ``model.hidden=[40, 40] (now [8, 8])``; at most six."""
    if not before or now is None:
        return ""
    now = OmegaConf.to_container(now, resolve=True) if OmegaConf.is_config(now) else now
    old, new = flatten(before), flatten(now)
    shown = []
    for group in ("algo", "model", "task"):
        if old.get(f"{group}.name") != new.get(f"{group}.name"):
            shown.append(f"{group}={old.get(f'{group}.name')} (now {new.get(f'{group}.name')})")
            continue
        shown += [
            f"{k}={old.get(k)} (now {new.get(k)})"
            for k in sorted(old.keys() & new.keys())
            if k.startswith(f"{group}.") and old[k] != new[k]
        ]
    more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
    return ", ".join(shown[:6]) + more


def restore(components: Components, checkpoint: dict[str, Any], source: str) -> LoopState:
    load_weights(components, checkpoint, source)
    optimizer, scheduler = checkpoint["optimizer"], checkpoint["scheduler"]
    if checkpoint.get("format_version", 1) == 1:
        optimizer, scheduler = split_groups(components.optimizer, optimizer, scheduler)
    components.optimizer.load_state_dict(optimizer)
    if components.scheduler is not None and scheduler is not None:
        components.scheduler.load_state_dict(scheduler)
    restore_rng(checkpoint["rng"], components.train_generator)
    return LoopState(
        iteration=checkpoint["iteration"],
        best_metric=checkpoint["best_metric"],
        best_iteration=checkpoint["best_iteration"],
        # (before it was recorded, only a validation with every task finite was kept)
        best_diverged=checkpoint.get(
            "best_diverged", None if checkpoint["best_metric"] is None else 0
        ),
        wall_time=checkpoint["wall_time"],
        eval_time=checkpoint.get("eval_time", 0.0),
        top=[list(entry) for entry in checkpoint.get("top", [])],
        window=checkpoint.get("window") or {},  # (older checkpoints: an empty window)
        nan_skipped=checkpoint.get("nan_skipped", 0),
        nan_in_a_row=checkpoint.get("nan_in_a_row", 0),
    )


def split_groups(
    current: torch.optim.Optimizer, optimizer: dict[str, Any], scheduler: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Format 1 had one parameter group, in the order of today's groups one after the
    other, with one learning rate and weight decay for all: give each group its share."""
    (old,) = optimizer["param_groups"]
    groups, start = [], 0
    for group in current.param_groups:
        size = len(group["params"])
        groups.append({**old, "name": group["name"], "params": old["params"][start : start + size]})
        start += size
    optimizer = {**optimizer, "param_groups": groups}
    if scheduler is not None:
        scheduler = {
            k: [v[0]] * len(groups) if isinstance(v, list) and len(v) == 1 else v
            for k, v in scheduler.items()
        }
    return optimizer, scheduler


def capture_rng(train_generator: torch.Generator) -> dict[str, Any]:
    """Every random state the run draws from, in types ``weights_only`` loading accepts."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "train_tasks": train_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        keys64 = torch.from_numpy(np.asarray(keys).astype("int64"))
        state["numpy"] = (name, keys64, pos, has_gauss, cached)
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any], train_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    train_generator.set_state(state["train_tasks"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:
            pass


def components_from(path: Path, device: str = "cpu") -> tuple[Components, dict[str, Any]]:
    """The components of the run that wrote a checkpoint, from its recorded config, with
    its weights loaded (figures, inspection)."""
    from metacli.build import build

    checkpoint = load_checkpoint(path)
    config = OmegaConf.create(checkpoint["config"])
    config.device = {**config.get("device", {}), "name": device}
    components = build(config, checkpoint.get("overrides", []))
    load_weights(components, checkpoint, str(path))
    return components, checkpoint
