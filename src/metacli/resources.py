"""The memory a run needs, estimated from its shapes before anything is allocated, and the
memory the machine can give it: a run that cannot fit is refused before it starts, naming
the setting that makes it large (docs/errors.md), instead of growing until the kernel's
out-of-memory killer ends it, and perhaps other people's jobs with it.

The model is built on PyTorch's ``meta`` device (shapes without storage) and, where it is
small, again on the CPU to run forward once on two examples (a large one runs on meta),
following the bytes of every tensor the pass creates. From that:

- the model's state: its parameters, their meta-gradient and the outer optimizer's two
  moments, and the algorithm's own per-parameter tensors (``MODEL_COPIES`` copies);
- a task in flight: its data, and per inner step the support pass's tensors (kept for
  the meta-gradient) and the adapted weights with their gradient, then the query pass;
  a meta-batch has ``train.meta_batch_size`` tasks in flight, an evaluation chunk
  ``val.batch_size`` / ``test.batch_size``;
- the fixed validation and test tasks, held whole while their evaluation runs
  (``val.num_tasks`` / ``test.num_tasks``);
- an image dataset's decoded cache (its image count times the image size).

It is an estimate, not a bound: docs/memory.md sets it beside what runs use.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from metacli import machine
from metacli.build import Resolved, resolve_device
from metacli.errors import ConfigError, MetacliError

# parameters, meta-gradient, Adam's two moments, the algorithm's per-parameter tensors
MODEL_COPIES = 5
FLOAT = 4  # bytes of a float32
# Measured against what runs use (docs/memory.md, benchmarks/memory.py): a meta-gradient
# through a backward pass written out (the MLPs) keeps that pass's tensors besides the
# forward pass's, and its own backward makes as many again; through autograd (the
# convolutional networks) about twice the forward pass's. An evaluation's step makes its
# gradient and transients (a written-out one more of them).
SECOND_ORDER_GRAPH = 4
FIRST_ORDER_GRAPH = 3
AUTOGRAD_GRAPH = 2
DATA_COPIES = 3  # a fixed task's data, with what drawing it leaves behind
EVALUATION_PASS = 3
AUTOGRAD_EVALUATION = 1.5
# The largest model and example run for real (a few hundred MB at most), the rest on meta.
REAL_PARAMETERS = 30_000_000
REAL_INPUT = 1_000_000
# a share of the available memory left to the interpreter, torch's own buffers and caches
HEADROOM = 0.8


@dataclass
class Need:
    """One part of a run's memory: the setting that sizes it (``key``, now ``count``),
    what it is, and its bytes: ``fixed`` + ``count`` x ``each``."""

    key: str
    what: str
    fixed: int
    each: int = 0
    count: int = 0
    # "": held all along; else the phase it lives in (train: a meta-batch; val, test: an
    # evaluation's fixed tasks and its chunk): phases take turns
    phase: str = ""

    @property
    def bytes(self) -> int:
        return self.fixed + self.count * self.each


def total(needs: list[Need]) -> int:
    """What is held all along, and the largest phase."""
    held = sum(need.bytes for need in needs if not need.phase)
    return held + max(phase_sums(needs, {id(n): n.bytes for n in needs}).values(), default=0)


def phase_sums(needs: list[Need], now: dict[int, int], but: Need | None = None) -> dict[str, int]:
    """Each phase's bytes (``now``: each part's, by id), without the part ``but``."""
    sums: dict[str, int] = {}
    for need in needs:
        if need.phase and need is not but:
            sums[need.phase] = sums.get(need.phase, 0) + now[id(need)]
    return sums


class Counting(TorchFunctionMode):
    """The bytes alive of the tensors that torch functions under it return: ``live`` now,
    ``peak`` the most at once. A tensor is alive until nothing holds it, autograd's saved
    tensors included; views and in-place results share their input's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def freed(self, count: int) -> None:
        self.live -= count

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "").endswith("_"):  # in place
            return out
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(value, torch.Tensor) or value._base is not None:
                continue
            if any(value is a for a in inputs):
                continue
            count = value.numel() * value.element_size()
            self.live += count
            self.peak = max(self.peak, self.live)
            weakref.finalize(value, self.freed, count)
        return out


def size(count: float) -> str:
    """Bytes as a person reads them: 512 B, 3.4 MB, 24.1 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError  # the loop returns at PB


@dataclass
class ModelShapes:
    parameters: int
    kept: int  # bytes an example's forward pass leaves for its backward
    transient: int  # the most bytes alive at once in an example's pass without a graph
    input_shape: tuple[int, ...]
    features: tuple[int, ...]  # an example's output (or the maps a head compares)
    training_batching: str  # how a meta-batch's tasks run (vmap: all at once)
    evaluation_batching: str
    written: bool  # its backward pass is written out (Model.functional_backward)


def model_shapes(resolved: Resolved, device: torch.device) -> ModelShapes:
    """The run's model, built and run forward on the meta device: it is never allocated."""
    task_cls, model_cls, algo_cls = (resolved.classes[g] for g in ("task", "model", "algo"))
    task_cfg, algo_cfg = resolved.typed["task"], resolved.typed["algo"]
    input_shape = task_cls.shape_of(task_cfg)
    output_dim = task_cls.outputs_of(task_cfg) if algo_cls.uses_head else None
    input_shape = tuple(algo_cls.model_input_shape(algo_cfg, tuple(input_shape)))
    examples = 2  # batch statistics need more than one
    with torch.device("meta"):  # shapes only: any size is counted, nothing allocated
        model = model_cls(resolved.typed["model"], input_shape, output_dim)
    parameters = sum(p.numel() for p in model.parameters())
    # A small model runs forward on a real CPU batch of two: PyTorch's meta kernels load
    # its compiler (seconds at every start); a large one (or large inputs) on meta.
    small = parameters <= REAL_PARAMETERS and math.prod(input_shape) <= REAL_INPUT
    if small:
        with torch.random.fork_rng():  # the run's random streams are not touched
            model = model_cls(resolved.typed["model"], input_shape, output_dim)
    params, buffers = model.named_tensors()
    inputs = torch.zeros(examples, *input_shape, device="cpu" if small else "meta")
    per_example = []
    for graph in (True, False):
        weights = {k: v.detach().requires_grad_(graph) for k, v in params.items()}
        counting = Counting()
        with counting:
            output = model.functional(weights, buffers, inputs)
            kept = counting.live
            features = tuple(getattr(model, "map_shape", None) or output.shape[1:])
            del output
        per_example.append((kept if graph else counting.peak) // examples)
    choice = getattr(algo_cfg, "batching", "auto")
    choice = "auto" if choice == "stacked" else choice

    def batching(graphs: bool) -> str:
        return choice if choice != "auto" else model.batching_for(device, graphs)

    written = model.functional_backward(params, inputs) is not None
    return ModelShapes(
        written=written,
        parameters=parameters,
        kept=per_example[0],
        transient=per_example[1],
        input_shape=input_shape,
        features=tuple(int(n) for n in features),
        training_batching=batching(algo_cls.keeps_graphs),
        evaluation_batching=batching(False),
    )


def in_flight(batching: str, tasks: int) -> int:
    """Tasks whose tensors are alive at once: vmap computes them all together, a loop
    one by one, threads one per worker."""
    if batching == "vmap":
        return tasks
    if batching == "threads":
        return min(tasks, torch.get_num_threads())
    return 1


def estimate(resolved: Resolved, device: torch.device, command: str = "train") -> list[Need] | None:
    """The parts of the run's memory, largest first; None where the task cannot say its
    shapes without its data (a plug-in's task: the check is skipped). ``command``: test
    has no meta-batch and no validation."""
    run, task_cls = resolved.run, resolved.classes["task"]
    task_cfg, algo_cfg = resolved.typed["task"], resolved.typed["algo"]
    if task_cls.shape_of(task_cfg) is None:
        return None
    model = model_shapes(resolved, device)
    weights = model.parameters * FLOAT
    example = math.prod(model.input_shape) * FLOAT + FLOAT  # inputs and a target

    def examples(split: str) -> tuple[int, int]:
        """Support and query examples of a task of ``split``."""
        train = split == "train"
        shots = task_cfg.shots if train else task_cfg.test_shots or task_cfg.shots
        queries = task_cfg.queries if train else task_cfg.test_queries or task_cfg.queries
        return shots * ways_of(split), queries * ways_of(split)

    def ways_of(split: str) -> int:
        if not task_cls.is_classification:
            return 1  # regression: shots are points
        return int(task_cfg.ways if split == "train" else task_cfg.test_ways or task_cfg.ways)

    def head(split: str) -> int:
        """What a task's head makes beyond the network (Relation Networks' pairs, ...)."""
        return algo_cls.head_bytes(algo_cfg, ways_of(split), *examples(split), model.features)

    algo_cls = resolved.classes["algo"]
    steps = int(getattr(algo_cfg, "inner_steps", 1) or 0)
    test_steps = getattr(algo_cfg, "test_inner_steps", None)
    test_steps = steps if test_steps is None else int(test_steps)
    support, query = examples("train")
    second_order = algo_cls.second_order(algo_cfg)
    kept_steps = max(steps, 1) if second_order else 1
    query_pass = model.kept if algo_cls.holds_query(algo_cfg) else model.transient
    graph = SECOND_ORDER_GRAPH if second_order else FIRST_ORDER_GRAPH
    training = (graph if model.written else AUTOGRAD_GRAPH) * (
        kept_steps * (support * model.kept + 2 * weights) + query * query_pass
    )
    support, query = examples("test")
    pass_factor = EVALUATION_PASS if model.written else AUTOGRAD_EVALUATION
    evaluation = int(pass_factor * (support * model.kept + weights + query * model.transient))
    # a task's data, and its loss and metric after each step (float64, kept to the end)
    task_data = DATA_COPIES * (support + query) * example + 2 * 8 * (test_steps + 1)
    batch, train_task = run.train.meta_batch_size, sum(examples("train")) * example
    # vmap computes a meta-batch (an evaluation's chunk) at once; a loop or threads a few
    together = model.training_batching == "vmap"
    needs = [
        Need(
            "model", f"the model's state ({model.parameters:,} parameters)", MODEL_COPIES * weights
        ),
        Need(
            "train.meta_batch_size",
            f"a meta-batch of {batch:,} tasks",
            fixed=0 if together else in_flight(model.training_batching, batch) * training,
            # a head runs on every task of the batch at once (and its graph is kept)
            each=train_task + (training if together else 0) + AUTOGRAD_GRAPH * head("train"),
            count=batch,
            phase="train",
        ),
    ]
    for split, name in (("val", "validation"), ("test", "test")):
        section = getattr(run, split)
        needs.append(
            Need(
                f"{split}.num_tasks",
                f"{section.num_tasks:,} {name} tasks",
                fixed=0,
                each=task_data,
                count=section.num_tasks,
                phase=split,  # drawn for each evaluation, freed after it
            )
        )
        chunk = min(section.batch_size, section.num_tasks)
        together = model.evaluation_batching == "vmap"
        needs.append(
            Need(
                f"{split}.batch_size",
                f"{chunk:,} {name} tasks adapted at once",
                fixed=0 if together else in_flight(model.evaluation_batching, chunk) * evaluation,
                each=(evaluation if together else 0) + head("test"),
                count=chunk,
                phase=split,
            )
        )
    images = task_cls.stored_images
    if images:
        cache = images * math.prod(model.input_shape)  # one byte a pixel
        needs.append(Need("task.image_size", f"{images:,} decoded images", cache))
    if command == "test":
        needs = [n for n in needs if not n.key.startswith(("train.", "val."))]
    return sorted(needs, key=lambda need: -need.bytes)


def available(device: torch.device) -> tuple[int, str]:
    """Bytes this process may still allocate on ``device``, and where that figure is from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    return machine.memory_room()


def check_memory(resolved: Resolved, command: str = "train") -> list[Need] | None:
    """Refuse a run whose estimate exceeds what its device can give, naming the setting
    behind the largest part; the estimate otherwise (None: the task cannot say)."""
    device = resolve_device(resolved.run.device)
    try:
        needs = estimate(resolved, device, command)
    except MetacliError:
        raise
    except Exception:  # a model the meta device cannot run: no estimate
        return None
    if needs is None:
        return None
    room, where = available(device)
    if total(needs) <= HEADROOM * room:
        return needs
    parts = "; ".join(f"{need.what}: {size(need.bytes)}" for need in needs if need.bytes)
    raise ConfigError(
        f"This {'meta-test' if command == 'test' else 'run'} needs about {size(total(needs))} "
        f"of memory, more than the "
        f"{size(HEADROOM * room)} it may take ({HEADROOM:.0%} of the {size(room)} {where}; "
        f"the rest is for Python and torch themselves). The parts: {parts}. "
        f"{advice(needs, HEADROOM * room, resolved)}, or run on a machine with more "
        f"memory. Nothing was started."
    )


SIZES = ("hidden", "filters", "widths", "channels", "cells")  # a model's size settings


def advice(needs: list[Need], room: float, resolved: Resolved) -> str:
    """How to make the run fit: each setting whose part alone exceeds what is left for
    it, with its largest value that fits; the sizes of a task and of the model where even
    one task (or the model alone) does not fit."""
    model = resolved.typed["model"]
    sizes = [f"model.{k}={v}" for k, v in vars(model).items() if k in SIZES and v is not None]
    task = resolved.typed["task"]
    if getattr(task, "image_size", None):
        sizes.append(f"or task.image_size={task.image_size}, which sizes its layers")
    shrink = f"make the model smaller ({', '.join(sizes) or 'model=' + model.name})"
    state = next((need for need in needs if need.key == "model"), None)
    if state is not None and state.bytes > room:
        return f"The model alone does not fit: {shrink}"
    now = {id(need): need.bytes for need in needs}  # as lowered so far, largest first
    lowers = []
    for part in needs:
        held = sum(now[id(n)] for n in needs if not n.phase and n is not part)
        phases = phase_sums(needs, now, but=part)
        # phases take turns: a phase's part has what is held and its phase's other parts
        # leave; a held part what the other held parts and the largest phase leave
        budget = (
            room
            - held
            - (phases.get(part.phase, 0) if part.phase else max(phases.values(), default=0))
        )
        if part.bytes <= budget:
            continue
        if part.key in ("model", "task.image_size"):
            return f"{part.what} does not fit: " + (
                shrink if part.key == "model" else "lower task.image_size"
            )
        fit = int((budget - part.fixed) // part.each) if part.each else 0
        if fit < 1:
            named = [k for k in ("ways", "shots", "queries", "image_size") if hasattr(task, k)]
            settings = ", ".join(f"task.{k}={getattr(task, k)}" for k in named)
            return (
                f"Even one task of {part.what} does not fit: make the tasks smaller "
                f"({settings}) or {shrink}"
            )
        now[id(part)] = part.fixed + fit * part.each
        lowers.append(f"{part.key} (now {part.count:,}; at most {fit:,} fits)")
    return "Lower " + " and ".join(lowers) if lowers else f"Lower the settings above, or {shrink}"
