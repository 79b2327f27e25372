"""The contract every component meets, and `metacli check <group>=<option> [overrides]`.

Built-in components are held to it by tests/test_contract.py; ``metacli check`` runs the
same checks on any option, a user's config file or plug-in included:

- **builds**: the option composes, passes its typed checks and computes a finite meta-loss;
- **task** (task options): episodes of the declared shapes and labels, the same episodes
  from the same generator, the same fixed validation and test tasks for the same seed;
- **model** (model options): the functional forward pass equals the module's, and a
  written backward pass (where the model has one) equals autograd's;
- **strategies**: ``algo.batching=loop``, ``vmap`` and ``threads`` give the same
  meta-loss, meta-gradient and evaluation in float64, on a model with batch norm;
- **resume**: 2N iterations equal N, a checkpoint written to disk and read back, and N
  more (parameters, buffers, optimizer state, every logged number);
- **seeds**: the same seed gives the same numbers, another seed other ones;
- **gradient**: the meta-gradient against central finite differences along random
  directions in float64, where it is the gradient of the meta-loss (second order, or no
  inner loop); a first-order one must differ from them.

Each check composes a small workload unless the overrides choose the task or model: a
3-way synthetic image task on a 3-filter Conv-4 (its batch norm is where strategies
differ), a tanh MLP for the finite differences. Checks run in this process, write only to
a temporary folder, and report what held.
"""

from __future__ import annotations

import signal
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from metacli.build import Components, build
from metacli.checkpoint import LoopState, load_checkpoint, restore, save_checkpoint
from metacli.composition import compose, config_folders, settled
from metacli.errors import ConfigError, MetacliError
from metacli.evaluation import fixed_tasks
from metacli.loop import meta_train, sample
from metacli.options import declared_keys
from metacli.signals import STOPPER, Interrupted
from metacli.tasks.base import TaskBatch

CHECKED_GROUPS = ("algo", "update", "model", "task")
IMAGES = (
    "task=synthetic",
    "task.image_size=16",
    "task.ways=3",
    "task.shots=2",
    "task.queries=2",
    "task.classes=8",
)
CONV4 = (*IMAGES, "model=conv4", "model.filters=3")
SMOOTH = (  # a tanh MLP on tiny images: smooth, so finite differences are exact
    "task=synthetic",
    "model=mlp",
    "model.hidden=[3]",
    "model.activation=tanh",
    "task.image_size=4",
    "task.ways=3",
    "task.shots=2",
    "task.queries=2",
    "task.classes=8",
)
SHORT = ("train.iterations=4", "train.val_every=2", "train.log_every=2", "val.num_tasks=3")


@dataclass
class Result:
    name: str
    held: bool | None  # None: does not apply
    detail: str


class MemoryRecorder:
    """A run folder in memory, for the loop (``metacli.evaluation.Recorder``)."""

    def __init__(self) -> None:
        self.root = Path("memory")
        self.writer = True
        self.records: list[dict[str, Any]] = []
        self.checkpoints: dict[str, dict[str, Any]] = {}
        self.files: dict[str, str | bytes] = {}
        self.tasks: list[str] = []  # tasks.csv's rows

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def log_tasks(self, lines: Iterable[str]) -> None:
        self.tasks += lines

    def save_checkpoint(self, name: str, checkpoint: dict[str, Any]) -> None:
        self.checkpoints[name] = checkpoint

    def remove_checkpoint(self, name: str) -> None:
        self.checkpoints.pop(name, None)

    def write_text(self, name: str, text: str | bytes) -> None:
        self.files[name] = text


def batch_of(components: Components) -> TaskBatch:
    """A training meta-batch, its inputs and real-valued targets in the default dtype (the
    float64 checks: image tasks decode to float32)."""
    batch = sample(components)
    dtype = torch.get_default_dtype()
    sx, sy, qx, qy = (t.to(dtype) if t.is_floating_point() else t for t in batch.tensors())
    return TaskBatch(sx, sy, qx, qy, batch.keys)


def episodes_of(components: Components, batch: TaskBatch) -> TaskBatch:
    """What ``evaluate`` is checked on: the training batch, or for an algorithm that
    trains on mini-batches of images (not episodes), validation episodes."""
    if components.algorithm.episodic:
        return batch
    tasks = fixed_tasks(components, "val", len(batch.support_x) + 2)
    dtype = torch.get_default_dtype()
    sx, sy, qx, qy = (t.to(dtype) if t.is_floating_point() else t for t in tasks.tensors())
    return TaskBatch(sx, sy, qx, qy, tasks.keys)


@contextmanager
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --- what the checks compare ------------------------------------------------------------
def distinct_rates(components: Components) -> None:
    """Learned rates all equal would hide a mix-up of tensors or steps."""
    rates: dict[str, Tensor] = getattr(components.algorithm, "learned_rates", dict)()
    with torch.no_grad():
        for k, rate in enumerate(rates.values()):
            wave = 1 + 0.3 * torch.sin(torch.arange(rate.numel()) + k).reshape(rate.shape)
            rate.mul_(wave)


def gradients(components: Components, batch: Any) -> tuple[Tensor, Tensor]:
    """The meta-gradient (flat) and the logged values (loss, metrics, terms) of a batch."""
    algorithm = components.algorithm
    algorithm.zero_grad()
    out = algorithm.meta_loss(batch)
    out.loss.backward()
    values = torch.cat(
        [out.loss.reshape(1), out.metric, *(t.reshape(1) for t in out.terms.values())]
    )
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
        for p in algorithm.parameters()
        if p.requires_grad  # meta-parameters (a model's context is not one: CAVIA's)
    ]
    return torch.cat(grads), values


def relative(ours: Tensor, theirs: Tensor) -> float:
    return (ours - theirs).norm().item() / max(theirs.norm().item(), 1e-12)


def state_of(components: Components) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in components.algorithm.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> str | None:
    """None if equal, else the first tensor that differs."""
    if a.keys() != b.keys():
        return f"different tensors: {sorted(a.keys() ^ b.keys())[:3]}"
    return next((k for k in a if not torch.equal(a[k], b[k])), None)


def numbers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = ("it_per_s", "wall_time")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def composed(overrides: list[str]) -> DictConfig:
    """The config ``metacli train OVERRIDES`` would run."""
    return settled("train", overrides, lambda args: compose("train", args))[1]


# --- the checks ---------------------------------------------------------------------------
class Contract:
    """The checks on one configuration: ``overrides`` compose it; ``smooth`` the one the
    finite differences use (a smooth network, few parameters)."""

    def __init__(self, overrides: list[str], smooth: list[str] | None = None) -> None:
        self.overrides = overrides
        self.smooth = smooth if smooth is not None else overrides

    def build(self, *extra: str, smooth: bool = False) -> Components:
        overrides = [*(self.smooth if smooth else self.overrides), *extra]
        return build(composed(overrides))

    def builds(self) -> Result:
        components = self.build()
        batch = components.task.sample(2, "train", torch.Generator().manual_seed(0))
        out = components.algorithm.meta_loss(batch)
        finite = bool(torch.isfinite(out.loss)) and tuple(out.metric.shape) == (2,)
        algo = components.cfg.algo.name
        detail = f"algo={algo} task={components.cfg.task.name} model={components.cfg.model.name}"
        return Result("builds", finite, f"{detail}; meta-loss {out.loss.item():.4g}")

    def strategies(self) -> Result:
        results = {}
        with float64():
            for strategy in ("loop", "vmap", "threads"):
                components = self.build(f"algo.batching={strategy}")
                if components.algorithm.batching != strategy:
                    return Result("strategies", None, f"{strategy} is not used by this algorithm")
                distinct_rates(components)
                batch = batch_of(components)
                grads, values = gradients(components, batch)
                components.algorithm.eval()
                evaluation = components.algorithm.evaluate(episodes_of(components, batch))
                results[strategy] = (grads, values, evaluation.loss, evaluation.metric)
        reference = results["loop"]
        if reference[0].norm() == 0:
            return Result("strategies", False, "the meta-gradient is zero: nothing to compare")
        # threads compute what the loop computes; vmap normalises with plain mean and
        # variance where the loop uses the fused kernel: float64 rounding differs
        errors = {
            strategy: max(relative(o, t) for o, t in zip(results[strategy], reference, strict=True))
            for strategy in ("vmap", "threads")
        }
        held = errors["vmap"] < 1e-8 and errors["threads"] < 1e-10
        detail = ", ".join(f"{s} vs loop {e:.1e}" for s, e in errors.items())
        return Result("strategies", held, f"{detail} (relative; float64)")

    def resume(self) -> Result:
        cfg = composed([*self.overrides, *SHORT])
        straight, whole = build(cfg), MemoryRecorder()
        meta_train(straight, whole, LoopState())
        first, half = build(cfg), MemoryRecorder()
        # A stop requested as a SIGTERM does: after iteration 1, in the middle of the train
        # line of iterations 1-2 (log_every 2), which the resumed run must complete.
        STOPPER.requested = signal.SIGTERM
        try:
            meta_train(first, half, LoopState())
        except Interrupted:
            pass
        finally:
            STOPPER.requested, STOPPER.stopping = None, False
        if half.checkpoints.get("last", {}).get("iteration") != 1:
            return Result("resume", False, "a stop requested at iteration 1 was not honoured")
        with tempfile.TemporaryDirectory(prefix="metacli-check-") as folder:
            path = Path(folder) / "last.pt"
            save_checkpoint(path, half.checkpoints["last"])
            resumed = build(cfg)
            state = restore(resumed, load_checkpoint(path), str(path))
        differs = same_state(state_of(first), state_of(resumed))
        if differs is not None:
            return Result("resume", False, f"the checkpoint does not restore {differs}")
        mine, theirs = resumed.optimizer.state_dict(), first.optimizer.state_dict()
        if mine["param_groups"] != theirs["param_groups"] or any(
            not torch.equal(v, mine["state"][i][k])
            for i, values in theirs["state"].items()
            for k, v in values.items()
        ):
            return Result("resume", False, "the checkpoint does not restore the optimizer")
        rest = MemoryRecorder()
        meta_train(resumed, rest, state)
        differs = same_state(state_of(straight), state_of(resumed))
        if differs is not None:
            return Result("resume", False, f"1 + 3 iterations differ from 4 in {differs}")
        if numbers(half.records + rest.records) != numbers(whole.records):
            return Result("resume", False, "1 + 3 iterations log other lines than 4")
        return Result(
            "resume",
            True,
            "4 iterations = 1 (stopped as by SIGTERM), checkpoint on disk, 3 more: the same "
            "state and metrics.jsonl lines, bit for bit",
        )

    def seeds(self) -> Result:
        runs = []
        for seed in (0, 0, 1):
            components = build(composed([*self.overrides, *SHORT, f"seed={seed}"]))
            components.run.train.iterations = 2
            recorder = MemoryRecorder()
            meta_train(components, recorder, LoopState())
            runs.append(numbers(recorder.records))
        held = runs[0] == runs[1] and runs[0] != runs[2]
        detail = "seed 0 twice: the same numbers; seed 1: other numbers"
        if runs[0] != runs[1]:
            detail = "seed 0 twice gave different numbers (a draw outside the task's stream?)"
        elif runs[0] == runs[2]:
            detail = "seeds 0 and 1 gave the same numbers: the seed is not used"
        return Result("seeds", held, detail)

    def gradient(self, directions: int = 3) -> Result:
        with float64():
            components = self.build(smooth=True)
            distinct_rates(components)
            batch = batch_of(components)
            analytic, _ = gradients(components, batch)
            params: list[Tensor] = [p for p in components.algorithm.parameters() if p.requires_grad]
            generator = torch.Generator().manual_seed(0)
            exact, numeric = [], []
            for _ in range(directions):
                # a unit direction: the step stays 1e-6 long however many parameters,
                # so that it crosses no kink of ReLU or max-pooling
                v = [torch.randn(p.shape, generator=generator) for p in params]
                norm = torch.cat([d.flatten() for d in v]).norm()
                v = [d / norm for d in v]
                flat = torch.cat([d.flatten() for d in v])
                numeric.append(self.directional(components, batch, params, v))
                exact.append((analytic @ flat).item())
        # over the directions together: one direction nearly orthogonal to the gradient
        # would leave only rounding in its ratio
        ours = torch.tensor(exact, dtype=torch.float64)
        theirs = torch.tensor(numeric, dtype=torch.float64)
        error = relative(ours, theirs) if theirs.norm() > 0 else float(ours.norm() > 0)
        if components.algorithm.exact_gradient:
            return Result(
                "gradient", error < 1e-6, f"{error:.1e} from finite differences (relative)"
            )
        # a first-order meta-gradient drops terms that are far from zero
        detail = f"first order: {error:.1e} from finite differences (it must differ)"
        return Result("gradient", error > 1e-3, detail)

    @staticmethod
    def directional(
        components: Components, batch: Any, params: list[Tensor], v: list[Tensor]
    ) -> float:
        eps = 1e-6
        losses = []
        originals = [p.detach().clone() for p in params]
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, o, d in zip(params, originals, v, strict=True):
                    p.copy_(o + sign * eps * d)
            # (with gradients on: an inner loop may need them)
            losses.append(components.algorithm.meta_loss(batch).loss.item())
        with torch.no_grad():
            for p, o in zip(params, originals, strict=True):
                p.copy_(o)
        return (losses[0] - losses[1]) / (2 * eps)

    def task(self) -> Result:
        components = self.build()
        task, seed = components.task, components.run.seed
        ways = getattr(task.cfg, "ways", None)
        one = task.sample(2, "train", torch.Generator().manual_seed(3))
        again = task.sample(2, "train", torch.Generator().manual_seed(3))
        problems = []
        shape = tuple(task.input_shape)
        if tuple(one.support_x.shape[2:]) != shape or tuple(one.query_x.shape[2:]) != shape:
            problems.append(f"inputs {tuple(one.support_x.shape[2:])}, declared {shape}")
        if one.support_y.shape[:2] != one.support_x.shape[:2] or len(one) != 2:
            problems.append("support inputs and targets of other sizes")
        if ways is not None and one.support_x.shape[1] != task.shots("train") * ways:
            problems.append(f"{one.support_x.shape[1]} support examples, not shots x ways")
        labels = torch.cat([one.support_y.flatten(), one.query_y.flatten()])
        top = ways if ways is not None else task.output_dim
        if task.is_classification and not 0 <= int(labels.min()) <= int(labels.max()) < top:
            problems.append(f"labels outside 0..{top - 1}")
        if any(not torch.equal(a, b) for a, b in zip(one.tensors(), again.tensors(), strict=True)):
            problems.append("the same generator gave other episodes")
        for split in ("val", "test"):
            a = fixed_tasks(components, split, 3)
            b = fixed_tasks(self.build(), split, 3)
            if any(not torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True)):
                problems.append(f"the {split} tasks of seed {seed} differ between two builds")
        detail = "; ".join(problems) or (
            f"episodes of {one.support_x.shape[1]} + {one.query_x.shape[1]} examples "
            f"{shape}, reproducible; fixed val and test tasks"
        )
        return Result("task", not problems, detail)

    def model(self) -> Result:
        with float64():
            components = self.build()
            model, batch = components.model, batch_of(components)
            x = batch.support_x[0]
            params, buffers = model.named_tensors()
            model.eval()
            error = relative(model.functional(params, buffers, x), model(x))
            details = [f"functional vs forward {error:.1e}"]
            held = error < 1e-10
            written = model.functional_backward(params, x)
            if written is not None:
                output, backward = written
                grad = torch.randn_like(output)
                names = list(params)
                mine = backward(grad, names)
                theirs = torch.autograd.grad(output, [params[n] for n in names], grad)
                gap = max(relative(mine[n], t) for n, t in zip(names, theirs, strict=True))
                details.append(f"written backward vs autograd {gap:.1e}")
                held = held and gap < 1e-10
        return Result("model", held, ", ".join(details))


def overrides_for(group: str, option: str, given: list[str]) -> tuple[list[str], list[str]]:
    """The overrides of the check of ``group=option`` and of its finite differences: a
    small workload unless ``given`` chooses the task or model, and two inner steps."""
    chooses = {o.split("=", 1)[0].lstrip("+") for o in given if "=" in o}
    own = "task" in chooses or "model" in chooses
    selection = [f"{group}={option}"] if group != "update" else [f"update={option}"]
    base, smooth = list(CONV4), list(SMOOTH)
    if group == "model":
        base, smooth = [*IMAGES], [*IMAGES]
    if group == "task":
        base = ["model=mlp", "model.hidden=[8]"]
        smooth = [*base, "model.activation=tanh"]
    if own:
        base, smooth = [], []
    base = [*selection, *base, "device=cpu", "train.meta_batch_size=3"]
    smooth = [*selection, *smooth, "device=cpu", "train.meta_batch_size=3"]
    cfg = composed([*base, *given])
    keys = declared_keys("algo", cfg.algo)
    inner = [
        f"algo.{k}={v}"
        for k, v in (("inner_steps", 2), ("test_inner_steps", 2), ("inner_lr", 0.1))
        if k in keys and f"algo.{k}" not in chooses
    ]
    return [*base, *inner, *given], [*smooth, *inner, *given]


CHECKS: dict[str, tuple[str, ...]] = {
    "algo": ("builds", "strategies", "resume", "seeds", "gradient"),
    "update": ("builds", "strategies", "resume", "seeds", "gradient"),
    "model": ("builds", "model", "strategies", "resume", "seeds", "gradient"),
    "task": ("builds", "task", "strategies", "resume", "seeds", "gradient"),
}


def run_checks(group: str, option: str, given: list[str]) -> list[Result]:
    """Every check of ``group=option``; a check that raises is reported as failed."""
    contract = Contract(*overrides_for(group, option, given))
    results = []
    for name in CHECKS[group]:
        check: Callable[[], Result] = getattr(contract, name)
        try:
            results.append(check())
        except MetacliError as err:
            results.append(Result(name, False, str(err)))
        except Exception as err:  # the component's own bug: say where
            where = traceback.extract_tb(err.__traceback__)[-1]
            detail = f"{type(err).__name__}: {err} ({where.filename}:{where.lineno})"
            results.append(Result(name, False, detail))
        if name == "builds" and not results[-1].held:
            break  # nothing else can run
    return results


def main(args: list[str]) -> int:
    """``metacli check <group>=<option> [overrides]``: 0 if every check held, 1 if one
    failed, 2 for a config that does not compose."""
    from rich.table import Table

    from metacli.console import CONSOLE

    args = config_folders(args)
    selected = [a for a in args if a.split("=", 1)[0] in CHECKED_GROUPS and "=" in a]
    if len(selected) != 1:
        raise ConfigError(
            "give one option to check, as <group>=<option> with group one of "
            f"{', '.join(CHECKED_GROUPS)} (e.g. metacli check algo=maml, metacli check "
            f"--config-dir myconf model=mymodel), then any overrides."
        )
    group, option = selected[0].split("=", 1)
    given = [a for a in args if a != selected[0]]
    results = run_checks(group, option, given)
    table = Table(title=f"metacli check {group}={option}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    marks = {True: "[green]held[/green]", False: "[red]failed[/red]", None: "does not apply"}
    for result in results:
        table.add_row(result.name, marks[result.held], result.detail)
    CONSOLE.print(table)
    failed = [r.name for r in results if r.held is False]
    CONSOLE.print(
        f"{len(results) - len(failed)} of {len(results)} checks held"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        soft_wrap=True,
    )
    return 1 if failed else 0
