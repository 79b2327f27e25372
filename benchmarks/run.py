"""Seconds per meta-iteration and peak memory of metacli against a plain per-task loop.

Usage: make bench   (or: python benchmarks/run.py [--workloads ...] [--speedups] [--out ...])

The reference is MAML as learn2learn's own examples write it, the strongest per-task loop
a user would write: an nn.Module, a Python loop over the tasks, ``torch.autograd.grad(
create_graph=True)`` for the inner steps, and each task's query loss backpropagated as
soon as it is computed (clone, adapt, backward), which frees that task's graph at once.
Every measurement runs in a fresh subprocess (so its peak memory is its own): the
median seconds per meta-iteration after warm-up, and the peak resident memory growth
of the process during the timed steps. The speed-up is measured apart: the reference
(for the other algorithms the plain loop, see ``plain_loop``) and metacli's default
strategy alternate step by step in one process, so both meet the same machine
conditions (separate processes on a shared machine differ by up to 10-20%); it is the
geometric mean of the per-round ratios with a 95% interval. Random tensors of the right
shapes stand in for data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ALGOS = [
    *("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "protonet", "pretrain"),
    *("metalstm", "alfa", "space"),
]
# Rows that are an update rule rather than an algorithm: the overrides that select them.
RULES = {"space": ["algo=maml", "update=space", "algo.adam_lr=0.01"]}
REFERENCE_ALGOS = ("maml", "fomaml")  # what reference_step implements
WORKLOADS: dict[str, dict[str, Any]] = {
    "sinusoid": {
        "title": "sinusoid MLP 1-40-40-1, meta-batch 25, K=10, 1 step",
        "overrides": [
            "task=sinusoid",
            "model=mlp",
            "train.meta_batch_size=25",
            "task.shots=10",
            "algo.inner_steps=1",
        ],
        "algos": [a for a in ALGOS if a != "protonet"],  # a regression task
        "repeats": (20, 15, 10),  # warm-up steps, timed repeats, steps per repeat
        "rounds": 200,  # alternating baseline / metacli steps for the speed-up
    },
    "omniglot_1step": {
        "title": "Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch 32, 15 queries, 1 step",
        "overrides": [
            "task=synthetic",
            "model=conv4",
            "model.filters=64",
            "task.ways=5",
            "task.shots=1",
            "task.queries=15",
            "train.meta_batch_size=32",
            "algo.inner_steps=1",
        ],
        "algos": ALGOS,
        "repeats": (1, 3, 1),
        "rounds": 8,
    },
    "omniglot_5step": {
        "title": "Omniglot-shaped 5-way 1-shot, Conv4-64, meta-batch 32, 15 queries, 5 steps",
        "overrides": [
            "task=synthetic",
            "model=conv4",
            "model.filters=64",
            "task.ways=5",
            "task.shots=1",
            "task.queries=15",
            "train.meta_batch_size=32",
            "algo.inner_steps=5",
        ],
        "algos": ALGOS,
        "repeats": (1, 2, 1),
        "rounds": 6,
    },
    "miniimagenet_5step": {
        "title": "mini-ImageNet-shaped 5-way 1-shot, Conv4-32, 84x84x3, meta-batch 4, 5 steps",
        "overrides": [
            "task=synthetic",
            "model=conv4",
            "model.filters=32",
            "task.ways=5",
            "task.shots=1",
            "task.queries=15",
            "task.image_size=84",
            "task.channels=3",
            "train.meta_batch_size=4",
            "algo.inner_steps=5",
        ],
        "algos": ALGOS,
        "repeats": (1, 3, 1),
        "rounds": 8,
    },
}


STRATEGIES = ("vmap", "loop", "threads")  # algo.batching, besides auto
# what a row measures in processes of its own (the last two: MAML and first-order MAML)
COLUMNS = (*STRATEGIES, "reference", "learn2learn")
EVAL_TASKS = {"sinusoid": 600, "omniglot_1step": 100, "omniglot_5step": 100}  # else 50


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_step(workload: str, algo: str, strategy: str) -> tuple[Any, Any]:
    """The components and a one-meta-iteration closure for (workload, algo, strategy)."""
    from hydra import compose, initialize_config_dir

    from metacli.build import build
    from metacli.loop import meta_step

    spec = WORKLOADS[workload]
    overrides = [*RULES.get(algo, [f"algo={algo}"]), *spec["overrides"], "device=cpu"]
    if algo == "protonet":
        overrides = [o for o in overrides if not o.startswith("algo.inner_steps")]
    if strategy == "auto" and os.environ.get("METACLI_BENCH_COMPILE") == "1":
        overrides.append("algo.compile=true")  # --compile: the default strategy, compiled
    if strategy not in ("reference", "learn2learn", "auto"):
        overrides.append(f"algo.batching={'loop' if strategy == 'plain' else strategy}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = build(compose("train", overrides=overrides))
    # (the baselines' inner loop; ProtoNet has none)
    steps, first_order = getattr(c.algorithm.cfg, "inner_steps", 0), algo == "fomaml"
    lr = getattr(c.algorithm.cfg, "inner_lr", 0.0)
    if strategy == "learn2learn":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(c.model, lr=lr, first_order=first_order)
        opt = c.optimizer

        def l2l_step() -> None:
            batch = c.task.sample(c.run.train.meta_batch_size, "train", c.train_generator)
            learn2learn_step(maml, opt, c.task.loss, batch, steps)

        return c, l2l_step
    if strategy == "reference":

        def step() -> None:
            batch = c.task.sample(c.run.train.meta_batch_size, "train", c.train_generator)
            reference_step(c.model, c.optimizer, c.task.loss, batch, steps, lr, first_order)

        return c, step
    if strategy == "plain":
        plain_loop(c.algorithm)
    return c, lambda: meta_step(c, None)


def plain_loop(algorithm: Any) -> None:
    """Make ``algorithm`` (built with ``algo.batching=loop``) the plain per-task loop.

    Each task's loss computed in a Python loop and the mean backpropagated once, so the
    whole meta-batch's graph is held until then: how a per-task loop is usually written,
    and the baseline of the algorithms the reference does not implement. metacli's own
    ``loop`` backpropagates each task as it goes instead (same numbers, less memory).
    """

    from metacli.algorithms.base import MetaLoss

    def mean_over_tasks(fn: Any, batch: Any, *shared: Any) -> Any:
        losses, metrics, terms = algorithm.executor.map(fn, batch.keys, shared, batch.tensors())
        means = {k: v.detach().mean() for k, v in terms.items()}
        return MetaLoss(losses.mean(), metrics.detach(), means)

    algorithm.mean_over_tasks = mean_over_tasks


def measure(workload: str, algo: str, strategy: str) -> dict[str, Any]:
    """Runs in the subprocess: one (workload, algo, strategy) measurement."""
    c, step = make_step(workload, algo, strategy)
    if strategy == "auto":  # which strategy auto picks, and evaluation's speed
        return {"strategy": c.algorithm.batching, **evaluation_speed(workload, c)}
    warmup, repeats, inner = WORKLOADS[workload]["repeats"]
    for _ in range(warmup):
        step()
    before = rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        times.append((time.perf_counter() - start) / inner)
    return {
        "seconds": statistics.median(times),
        "peak_mb": rss_mb(),
        "growth_mb": rss_mb() - before,
    }


def evaluation_speed(workload: str, c: Any) -> dict[str, Any]:
    """Seconds per 100 tasks of validation (adapt on the support set, the query measured
    after each of the ``test_inner_steps``), as the loop runs it, and of the same as a
    per-task loop would (MAML and first-order MAML: no graph kept, queries under no_grad)."""
    from metacli.evaluation import evaluate

    tasks = EVAL_TASKS.get(workload, 50)
    evaluate(c, "val", min(tasks, 4), min(tasks, 4))  # warm-up
    start = time.perf_counter()
    evaluate(c, "val", tasks, c.run.val.batch_size)
    out: dict[str, Any] = {
        "eval_tasks": tasks,
        "eval_s_per_100": 100 * (time.perf_counter() - start) / tasks,
    }
    algo = c.algorithm
    if algo.cfg.name in REFERENCE_ALGOS:
        from metacli.evaluation import fixed_tasks

        batch = fixed_tasks(c, "val", tasks)
        start = time.perf_counter()
        reference_eval(c.model, c.task, batch, algo.test_steps, algo.test_lr)
        out["reference_eval_s_per_100"] = 100 * (time.perf_counter() - start) / tasks
    return out


def reference_eval(model: Any, task: Any, batch: Any, steps: int, lr: float) -> Any:
    """Per-task evaluation as a loop writes it: plain gradient steps without a graph, the
    query loss and metric after each (what metacli's evaluate reports)."""
    import torch

    names = [n for n, _ in model.named_parameters()]
    results = []
    for i in range(len(batch)):
        fast = [p.detach().requires_grad_() for p in model.parameters()]
        row = []
        for step in range(steps + 1):
            with torch.no_grad():
                out = torch.func.functional_call(
                    model, dict(zip(names, fast, strict=True)), (batch.query_x[i],)
                )
                row.append((task.loss(out, batch.query_y[i]), task.metric(out, batch.query_y[i])))
            if step == steps:
                break
            out = torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (batch.support_x[i],)
            )
            grads = torch.autograd.grad(task.loss(out, batch.support_y[i]), fast)
            fast = [
                (p - lr * g).detach().requires_grad_() for p, g in zip(fast, grads, strict=True)
            ]
        results.append(row)
    return results


def sampling_cost(rounds: int = 20) -> dict[str, Any] | None:
    """Seconds to sample one Omniglot meta-batch (32 tasks, 5-way 1-shot, 15 queries)."""
    root = ROOT.parent / "shared" / "data" / "omniglot"
    if not (root / "images_background.zip").is_file():
        return None
    from metacli.tasks.omniglot import Omniglot, OmniglotConfig

    task = Omniglot(OmniglotConfig(ways=5, shots=1, queries=15), str(root))
    gen = torch_generator()
    task.sample(32, "train", gen)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        task.sample(32, "train", gen)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "data": os.path.relpath(root, ROOT)}


def torch_generator() -> Any:
    import torch

    return torch.Generator().manual_seed(0)


def baseline(algo: str) -> str:
    """What the default strategy's speed-up is measured against.

    The loop reference of this file for MAML and first-order MAML; for the other
    algorithms ``plain_loop``: metacli's per-task functions (which tests check against
    independent per-task loops) called in a plain Python loop.
    """
    return "reference" if algo in REFERENCE_ALGOS else "plain"


def baselines(algo: str) -> list[str]:
    """Every baseline the default strategy is timed against: ``baseline(algo)``, and
    learn2learn itself for MAML and first-order MAML where it is importable."""
    extra = ["learn2learn"] if algo in REFERENCE_ALGOS and have_learn2learn() else []
    return [baseline(algo), *extra]


def ratio(base: list[float], ours: list[float]) -> dict[str, float]:
    """Geometric mean of base / ours over paired rounds, with a 95% interval."""
    logs = [math.log(r / o) for r, o in zip(base, ours, strict=True)]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return {
        "speedup": math.exp(mean),
        "speedup_low": math.exp(mean - half),
        "speedup_high": math.exp(mean + half),
    }


def alternating(steps: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Seconds of each step over ``rounds`` rounds, the steps taking turns within each
    round, after one warm-up call each (for steps of a second or more: a whole step a turn)."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


# Seconds each side of an interleaved comparison runs per turn (whole steps). A
# millisecond step alternating one by one with a 14 ms neighbour would be timed with
# caches that the neighbour emptied, which no run meets; a turn of 20 ms keeps each warm.
BLOCK_S = 0.02


def interleaved(workload: str, algo: str, rounds: int) -> dict[str, Any]:
    """The baselines and metacli's default strategy timed alternately in ONE process.

    Separate processes (as in the table) add a few percent of process-to-process noise;
    alternating in one process compares them under the same conditions. Each side runs
    whole steps for about ``BLOCK_S`` per turn (one step where a step is longer). Reports
    the median ms per step of each and the speed-up (baseline / metacli) with a 95%
    interval from the per-round log ratios, against ``baseline(algo)`` and (``vs``) every
    other baseline.
    """
    components, ours = make_step(workload, algo, "auto")
    names = baselines(algo)
    steps = {name: make_step(workload, algo, name)[1] for name in names}
    steps["metacli"] = ours
    times: dict[str, list[float]] = {name: [] for name in steps}
    block = {}  # steps per turn: each side runs for about BLOCK_S at a time, as in a run
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        block[name] = max(1, round(BLOCK_S / (time.perf_counter() - start)))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(block[name]):
                step()
            times[name].append((time.perf_counter() - start) / block[name])
    base = names[0]
    executor = components.algorithm.executor
    return {
        "strategy": components.algorithm.batching,
        **({"compile_s": executor.compile_seconds} if executor.compile else {}),
        "baseline": base,
        "baseline_ms": 1e3 * statistics.median(times[base]),
        "metacli_ms": 1e3 * statistics.median(times["metacli"]),
        "rounds": rounds,
        "steps_per_turn": block,
        **ratio(times[base], times["metacli"]),
        "vs": {
            name: {
                "ms": 1e3 * statistics.median(times[name]),
                **ratio(times[name], times["metacli"]),
            }
            for name in names[1:]
        },
    }


def reference_step(
    model: Any, optimizer: Any, loss_fn: Any, batch: Any, steps: int, lr: float, first_order: bool
) -> None:
    """One outer step of MAML written as learn2learn's examples write it: a loop over the
    tasks, each task's query loss (divided by the meta-batch size) backpropagated as soon
    as it is computed, so only one task's graph is held at a time."""
    import torch

    optimizer.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    size = len(batch)
    for i in range(size):
        fast = list(model.parameters())
        for _ in range(steps):
            out = torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (batch.support_x[i],)
            )
            grads = torch.autograd.grad(
                loss_fn(out, batch.support_y[i]), fast, create_graph=not first_order
            )
            fast = [p - lr * g for p, g in zip(fast, grads, strict=True)]
        out = torch.func.functional_call(
            model, dict(zip(names, fast, strict=True)), (batch.query_x[i],)
        )
        (loss_fn(out, batch.query_y[i]) / size).backward()
    optimizer.step()


def learn2learn_version() -> str | None:
    if not have_learn2learn():
        return None
    import learn2learn

    return str(learn2learn.__version__)


def have_learn2learn() -> bool:
    """Whether learn2learn can be imported here (see benchmarks/README.md to install it)."""
    import importlib.util

    if importlib.util.find_spec("learn2learn") is None:
        return False
    try:
        import learn2learn  # noqa: F401
    except Exception:  # an install that does not load (torchvision, gym, numpy ...)
        return False
    return True


def learn2learn_step(maml: Any, optimizer: Any, loss_fn: Any, batch: Any, steps: int) -> None:
    """One outer step as learn2learn's examples/vision/maml_omniglot.py runs it: for each
    task clone the ``l2l.algorithms.MAML`` wrapper, ``adapt`` it, backpropagate the query
    loss at once; then scale the summed gradients by 1 / meta-batch and step."""
    optimizer.zero_grad()
    size = len(batch)
    for i in range(size):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(batch.support_x[i]), batch.support_y[i]))
        loss_fn(learner(batch.query_x[i]), batch.query_y[i]).backward()
    for p in maml.parameters():
        if p.grad is not None:
            p.grad.data.mul_(1.0 / size)
    optimizer.step()


def speedup(workload: str, algo: str) -> dict[str, Any]:
    """The interleaved comparison of one row, in a process of its own."""
    rounds = str(WORKLOADS[workload]["rounds"])
    return run_child("--interleaved", workload, algo, "--rounds", rounds)


def run_one(workload: str, algo: str, strategy: str) -> dict[str, Any]:
    return run_child("--one", workload, algo, strategy)


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleaved",
        nargs=2,
        metavar=("WORKLOAD", "ALGO"),
        help="time the baseline and the default strategy alternately in one process",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--algos", nargs="+", choices=ALGOS, default=ALGOS, help="measure only these rows"
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=COLUMNS,
        default=list(COLUMNS),
        help="re-measure only these columns of the existing rows (not the speed-ups)",
    )
    parser.add_argument(
        "--sampling",
        action="store_true",
        help="only measure episode sampling; update the existing report",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --speedups: metacli with algo.compile=true (the warm-up step compiles; "
        "its seconds are reported apart), recorded as speedup_compiled",
    )
    parser.add_argument(
        "--speedups",
        action="store_true",
        help="only re-measure the interleaved speed-ups; update the existing report",
    )
    args = parser.parse_args()
    if args.sampling or args.speedups:
        report = json.loads(args.out.with_suffix(".json").read_text())
        if args.sampling:
            report["sampling"] = sampling_cost()
        if args.speedups:  # the environment of the speed-up columns (may be another's)
            import torch

            env = {"torch": str(torch.__version__), "learn2learn": learn2learn_version()}
            report["meta"]["speedups"] = env
        for row in report["rows"] if args.speedups else []:
            if row["workload"] in args.workloads and row["algo"] in args.algos:
                key = "speedup_compiled" if args.compile else "speedup"
                if args.compile:
                    os.environ["METACLI_BENCH_COMPILE"] = "1"  # read by the child process
                row[key] = speedup(row["workload"], row["algo"])
                row["auto_strategy"] = row[key]["strategy"]  # (what auto picks now)
                print(json.dumps(row[key]), flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        write_markdown(
            args.out.with_suffix(".md"),
            markdown(report["meta"], report["rows"], report["sampling"]),
        )
        print(args.out.with_suffix(".md").read_text())
        return
    if args.interleaved:
        print(json.dumps(interleaved(*args.interleaved, args.rounds)))
        return
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    import torch

    rows, old = [], {}
    previous = args.out.with_suffix(".json")
    whole_rows = set(args.strategies) == set(COLUMNS)
    partial = set(args.workloads) != set(WORKLOADS) or set(args.algos) != set(ALGOS)
    if (partial or not whole_rows) and previous.exists():  # keep what is not measured now
        for r in json.loads(previous.read_text())["rows"]:
            if r["workload"] not in args.workloads or r["algo"] not in args.algos:
                rows.append(r)
            elif not whole_rows:
                old[r["workload"], r["algo"]] = r
    for workload, spec in WORKLOADS.items():
        if workload not in args.workloads:
            continue
        for algo in (a for a in spec["algos"] if a in args.algos):
            row: dict[str, Any] = {"workload": workload, "title": spec["title"], "algo": algo}
            row = old.get((workload, algo), {}) | row
            for strategy in args.strategies:
                if strategy in STRATEGIES or (
                    algo in REFERENCE_ALGOS and (strategy != "learn2learn" or have_learn2learn())
                ):
                    row[strategy] = run_one(workload, algo, strategy)
            auto = run_one(workload, algo, "auto")
            row["auto_strategy"] = auto.pop("strategy")
            row["evaluation"] = auto
            row["columns_env"] = {"torch": str(torch.__version__), "columns": args.strategies}
            if whole_rows:
                row["speedup"] = speedup(workload, algo)
            print(json.dumps(row), flush=True)
            rows.append(row)
    rows.sort(key=lambda r: list(WORKLOADS).index(r["workload"]))
    kept = json.loads(previous.read_text())["meta"] if rows and previous.exists() else {}
    meta = {
        **kept,  # a partial pass keeps the environment of the rows it did not measure
        "torch": str(kept.get("torch", torch.__version__)),
        "threads": torch.get_num_threads(),
        "learn2learn": learn2learn_version() or kept.get("learn2learn"),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "command": "make bench",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sampling = sampling_cost()
    report = {"meta": meta, "rows": rows, "sampling": sampling}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(args.out.with_suffix(".md"), markdown(meta, rows, sampling))
    print(markdown(meta, rows, sampling))


START, END = "<!-- generated by benchmarks/run.py: start -->", "<!-- generated: end -->"


def write_markdown(path: Path, table: str) -> None:
    """The generated part of ``path`` replaced by ``table``; the notes around it kept."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
    else:
        before, after = "", ""
    path.write_text(f"{before}{START}\n{table}{END}{after}")


def ms(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{1e3 * entry['seconds']:.1f}"


def mb(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['peak_mb']:.0f}"


def fold(fast: dict[str, Any] | None) -> str:
    if fast is None:
        return "-"
    return f"{fast['speedup']:.2f}x [{fast['speedup_low']:.2f}-{fast['speedup_high']:.2f}]"


def markdown(
    meta: dict[str, Any], rows: list[dict[str, Any]], sampling: dict[str, Any] | None = None
) -> str:
    l2l = meta.get("learn2learn")
    fast_env = meta.get("speedups")
    where = (
        ""
        if not fast_env
        else f" The speed-up columns were measured with torch {fast_env['torch']} and "
        f"learn2learn {fast_env['learn2learn'] or 'not installed'} (benchmarks/README.md)."
    )
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (torch {meta['torch']}, {meta['threads']} CPU threads, "
        f"{meta['machine']}; learn2learn {l2l or 'not installed'}). Median milliseconds "
        "per meta-iteration after warm-up, each measured in its own process. `reference`: "
        "MAML as learn2learn's examples write it (`reference_step` in `benchmarks/run.py`: "
        "a per-task loop that backpropagates each task as it goes; MAML and first-order "
        "MAML only); `learn2learn`: learn2learn's own `MAML` wrapper (clone, adapt, "
        "backward per task, as its examples/vision/maml_omniglot.py), where it is "
        "installed (benchmarks/README.md). `speed-up of auto` = baseline time / time of "
        "the strategy that `algo.batching=auto` picks, the two alternating step by step "
        "in one process (geometric mean over rounds, 95% interval in brackets; "
        "`python benchmarks/run.py --speedups` re-measures only these); the baseline is "
        "the reference for maml and fomaml and, for the other algorithms, `plain`: "
        "metacli's per-task functions in a plain Python loop that keeps the whole "
        "meta-batch's graph for one backward pass (`algo.batching=loop` backpropagates "
        "each task as it goes). `peak MB` is the process's peak resident memory. "
        "`eval s/100` is validation's seconds per 100 tasks (adapt with `test_inner_steps`, "
        "the query measured after each step), metacli / a per-task reference loop." + where,
        "",
        "| workload | algo | reference ms | learn2learn ms | vmap ms | loop ms | threads ms "
        "| auto picks | speed-up of auto [95%] over | over learn2learn | eval s/100 | "
        "peak MB ref / l2l / vmap / loop / threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fast = r.get("speedup")
        over = "-" if fast is None else f"{fold(fast)} {baseline(r['algo'])}"
        vs = (fast or {}).get("vs", {}).get("learn2learn")
        times = " | ".join(ms(r.get(s)) for s in STRATEGIES)
        peaks = " / ".join(mb(r.get(s)) for s in ("reference", "learn2learn", *STRATEGIES))
        ev = r.get("evaluation") or {}
        evals = "-"
        if "eval_s_per_100" in ev:
            ref = ev.get("reference_eval_s_per_100")
            evals = f"{ev['eval_s_per_100']:.2f}" + ("" if ref is None else f" / {ref:.2f}")
        env = r.get("columns_env")
        mark = "" if not env or env["torch"] == meta["torch"] else " (torch " + env["torch"] + ")"
        lines.append(
            f"| {r['title']} | {r['algo']}{mark} | {ms(r.get('reference'))} | "
            f"{ms(r.get('learn2learn'))} | {times} | {r['auto_strategy']} | {over} | "
            f"{fold(vs)} | {evals} | {peaks} |"
        )
    compiled = [r for r in rows if r.get("speedup_compiled")]
    if compiled:
        lines += [
            "",
            "With `algo.compile=true` (`python benchmarks/run.py --speedups --compile "
            "--workloads ... --algos ...`): the default strategy compiled, the warm-up step "
            "compiling (its seconds apart), against the same baselines in one process.",
            "",
            "| workload | algo | compile s | compiled ms | speed-up over | over learn2learn |",
            "|---|---|---|---|---|---|",
        ]
        for r in compiled:
            fast = r["speedup_compiled"]
            vs = fast.get("vs", {}).get("learn2learn")
            lines.append(
                f"| {r['title']} | {r['algo']} | {fast.get('compile_s', 0):.1f} | "
                f"{fast['metacli_ms']:.1f} | {fold(fast)} {fast['baseline']} | {fold(vs)} |"
            )
    if sampling is not None:
        maml = next(
            (r for r in rows if r["workload"] == "omniglot_1step" and r["algo"] == "maml"), None
        )
        share = ""
        if maml is not None:
            step = maml[maml["auto_strategy"]]["seconds"]
            share = (
                f", {100 * sampling['seconds'] / step:.2f}% of the Omniglot-shaped MAML "
                f"meta-iteration above ({1e3 * step:.0f} ms)"
            )
        lines += [
            "",
            f"Episode sampling from the real Omniglot cache ({sampling['data']}): "
            f"{1e3 * sampling['seconds']:.1f} ms per meta-batch of 32 5-way 1-shot tasks "
            f"with 15 queries{share}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
