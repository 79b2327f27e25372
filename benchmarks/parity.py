"""Equal-budget parity with learn2learn 0.2.0's own examples (docs/RESULTS.md, Parity).

Each suite trains the same learner twice, on the same data and protocol for the same
number of iterations, from the same initial weights: once with ``metacli train`` (its own
process) and once with the training loop of a learn2learn example, its ``MAML`` wrapper and
its task pipeline. Both are validated and meta-tested on the same fixed tasks by metacli's
evaluator, so ``metacli compare`` pairs them task by task; learn2learn's run also meta-tests
its weights with the example's own ``fast_adapt`` on those tasks, as a check of the
evaluator. Needs learn2learn (benchmarks/README.md builds it).

    python benchmarks/parity.py [--suites maml fomaml protonet sinusoid] [--seeds 0 1 2]
        [--iterations 1000] [--out outputs/parity] [--jobs 2] [--l2l-root /tmp/l2l-omniglot]

Suites (each its example's settings; ``SUITES`` lists the metacli overrides):
  maml, fomaml  examples/vision/maml_omniglot.py: OmniglotFC (784-256-128-64-64-5 with batch
                norm), one inner step of 0.5, meta-batch 32, Adam 3e-3; Omniglot 5-way 1-shot
                with one query per class; a random 1,100 / 100 / 423 character split with
                random 90-degree rotations; LANCZOS 28x28, ink 1
  protonet      examples/vision/protonet_miniimagenet.py on Omniglot: Conv-4 (64 filters,
                max-pooling; batch norm with running statistics at evaluation), 5-way 1-shot
                with 15 queries (the example trains 30-way, six times the compute, and tests
                with 30 queries, more than Omniglot's 20 images), Adam 1e-3 halved every
                2,000 episodes
  sinusoid      examples/maml_sine.py's loop on the maml_sinusoid preset: 1-40-40-1, one
                step of 0.01, K=10, meta-batch 25, Adam 1e-3; tests K=5 after 10 steps

Run folders: <out>/<suite>/metacli/seed<k>/ (metacli's) and <out>/<suite>/learn2learn/
seed<k>/ (summary.json, metrics.jsonl, tasks.csv and checkpoints/ in metacli's formats,
``implementation: learn2learn``). Then: metacli compare <out>/<suite> --group-by
implementation, or ``--report FIGURE.png`` for the table and the curves.

``--metacli-tasks`` (maml, fomaml, protonet) runs the example's loop on the meta-batches metacli's
own run draws (learn2learn_metacli_tasks/): the same data in the same order, so only the
algorithms differ; ``--check-steps N`` also computes metacli's meta-gradient at the
example's weights on each of the first N batches and records the largest relative gap.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "omniglot"

OMNIGLOT = [
    "task=omniglot",
    "task.split=random",
    "task.resize=lanczos",
    "task.rotations=[0,90,180,270]",
    "task.test_rotations=[0,90,180,270]",
    "task.ways=5",
    "task.shots=1",
]
OMNIGLOT_FC = [
    *OMNIGLOT,
    "task.queries=1",
    "model=mlp",
    "model.hidden=[256,128,64,64]",
    "model.norm=transductive",
    "model.norm_eps=0.001",
    "model.init=truncated_normal",
    "algo.inner_lr=0.5",
    "algo.inner_steps=1",
    "algo.test_inner_steps=1",
    "optim.lr=0.003",
    "train.meta_batch_size=32",
]


@dataclass
class Suite:
    overrides: list[str]
    example: str  # the learn2learn example whose loop the other run follows
    val_tasks: int = 600
    test_tasks: int = 600
    extra: dict[str, Any] = field(default_factory=dict)


SUITES = {
    "maml": Suite(["algo=maml", *OMNIGLOT_FC], "vision/maml_omniglot.py"),
    "fomaml": Suite(["algo=fomaml", *OMNIGLOT_FC], "vision/maml_omniglot.py"),
    "protonet": Suite(
        [
            "algo=protonet",
            *OMNIGLOT,
            "task.queries=15",  # the example's test queries, 30, exceed Omniglot's 20 images
            "model=conv4",
            "model.norm=running",
            "optim.lr=0.001",
            "optim.scheduler=step",
            "optim.step_size=2000",
            "optim.gamma=0.5",
            "train.meta_batch_size=1",
        ],
        "vision/protonet_miniimagenet.py",
        val_tasks=300,
    ),
    "sinusoid": Suite(["experiment=maml_sinusoid"], "maml_sine.py"),
}


def utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_overrides(suite: str, seed: int, iterations: int, val_every: int) -> list[str]:
    data = [f"data.root={DATA}"] if suite != "sinusoid" else []
    spec = SUITES[suite]
    return [
        *spec.overrides,
        *data,
        f"seed={seed}",
        f"train.iterations={iterations}",
        f"train.val_every={val_every}",
        f"val.num_tasks={spec.val_tasks}",
        f"test.num_tasks={spec.test_tasks}",
        "test.report_last=true",
        "threads=1",
    ]


# --- learn2learn's side -------------------------------------------------------------


def example_module(name: str) -> Any:
    """The example file itself (its ``fast_adapt``), from learn2learn's source tree."""
    import learn2learn

    path = Path(learn2learn.__file__).resolve().parents[1] / "examples" / name
    if not path.is_file():
        sys.exit(f"{path} is missing: build learn2learn from its source (benchmarks/README.md).")
    if name == "maml_sine.py" and importlib.util.find_spec("torchmeta") is None:
        # its data loader's package; the tasks come from metacli's sinusoid here
        import types

        for module_name in (
            "torchmeta",
            "torchmeta.toy",
            "torchmeta.utils",
            "torchmeta.utils.data",
        ):
            sys.modules.setdefault(module_name, types.ModuleType(module_name))
        sys.modules["torchmeta.toy"].Sinusoid = None  # type: ignore[attr-defined]
        sys.modules["torchmeta.utils.data"].BatchMetaDataLoader = None  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchvision_root(root: Path) -> Path:
    """Omniglot as torchvision's ``Omniglot`` reads it (omniglot-py/ with the archives and
    their folders), made once outside the repository from the official archives."""
    target = root / "omniglot-py"
    for name in ("images_background", "images_evaluation"):
        archive = target / f"{name}.zip"
        if not (target / name).is_dir():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DATA / f"{name}.zip", archive)
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(target)
    return root


def omniglot_tasksets(components: Any, root: Path, ways: int, samples: int) -> Any:
    """learn2learn's Omniglot benchmark (vision/benchmarks/omniglot_benchmark.py: its
    transforms and task pipeline) on metacli's character split: the training tasks."""
    import learn2learn as l2l
    from PIL.Image import LANCZOS
    from torchvision import transforms
    from torchvision.datasets import Omniglot

    # The archives here hold the official images in another packing (another checksum than
    # torchvision's); check_pixels below compares the images themselves.
    Omniglot._check_integrity = lambda self: os.path.isdir(  # type: ignore[method-assign]
        os.path.join(self.root, self._get_target_folder())
    )
    data_transforms = transforms.Compose(
        [transforms.Resize(28, interpolation=LANCZOS), transforms.ToTensor(), lambda x: 1.0 - x]
    )
    omniglot = l2l.vision.datasets.FullOmniglot(
        root=str(torchvision_root(root)), transform=data_transforms, download=False
    )
    background, evaluation = omniglot.dataset.datasets
    label_of = {name: i for i, name in enumerate(background._characters)}
    label_of |= {
        name: i + len(background._characters) for i, name in enumerate(evaluation._characters)
    }
    names = components.task.split_names()["train"]
    labels = sorted({label_of[character] for character, _ in names})
    dataset = l2l.data.MetaDataset(omniglot)
    train = l2l.data.FilteredMetaDataset(dataset, labels=labels)
    pipeline = [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=samples),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
    ]
    check_pixels(omniglot, components)
    return l2l.data.TaskDataset(train, task_transforms=pipeline, num_tasks=20000)


def check_pixels(omniglot: Any, components: Any) -> None:
    """The two pipelines' images must be the same pixels: the first image of each set."""
    task = components.task
    background, evaluation = omniglot.dataset.datasets
    for dataset, offset in ((background, 0), (evaluation, len(background))):
        image, label = omniglot[offset]
        file_name, character = dataset._flat_character_images[0]
        name = dataset._characters[character]
        assert label == character + (0 if offset == 0 else len(background._characters))
        folder = Path(dataset.target_folder) / name
        position = sorted(os.listdir(folder)).index(file_name)  # metacli: in path order
        ours = task.images[task.class_images[task.characters.index(name)][position]]
        gap = float((image - ours.float() / 255).abs().max())
        if gap > 1 / 255 + 1e-6:
            sys.exit(f"Omniglot pixels differ between the pipelines by {gap:.4f} on {name}")


def mapping(suite: str) -> Callable[[str], str]:
    """metacli's parameter and buffer names -> the example model's."""

    def fc(name: str) -> str:
        if name.startswith("head."):
            return name.replace("head.", "classifier.")
        _, index, leaf = name.split(".")
        block, part = divmod(int(index) - 1, 3)
        return f"features.1.{block}.{'linear' if part == 0 else 'normalize'}.{leaf}"

    def conv(name: str) -> str:
        _, block, part, leaf = name.split(".")
        return f"encoder.{block}.{'conv' if part == 'conv' else 'normalize'}.{leaf}"

    def sine(name: str) -> str:
        layer = {"body.1": "hidden1", "body.3": "hidden2", "head": "hidden3"}
        prefix, leaf = name.rsplit(".", 1)
        return f"{layer[prefix]}.{leaf}"

    return {"maml": fc, "fomaml": fc, "protonet": conv, "sinusoid": sine}[suite]


def copy_weights(ours: Any, theirs: Any, names: Callable[[str], str], into_example: bool) -> None:
    """metacli's model <-> the example's, tensor by tensor (every tensor has a twin)."""
    import torch

    mine, other = ours.state_dict(), theirs.state_dict()
    with torch.no_grad():
        for name, tensor in mine.items():
            if names(name) not in other and name.endswith(("running_mean", "running_var")):
                continue  # batch statistics only (track_running_stats=False): none to copy
            twin = other[names(name)]
            if into_example:
                twin.copy_(tensor)
            else:
                tensor.copy_(twin)


def example_model(suite: str, components: Any) -> Any:
    import learn2learn as l2l

    if suite in ("maml", "fomaml"):
        return l2l.vision.models.OmniglotFC(28**2, components.cfg.task.ways)
    if suite == "protonet":
        return example_module(SUITES[suite].example).Convnet(x_dim=1)
    return example_module(SUITES[suite].example).SineModel(dim=40)


class Recorder:
    """The learn2learn run's folder in metacli's formats, for compare and sharpness.py."""

    def __init__(self, folder: Path, components: Any) -> None:
        from metacli.evaluation import TASKS_HEADER

        if folder.exists():
            shutil.rmtree(folder)
        (folder / "checkpoints").mkdir(parents=True)
        self.folder, self.components = folder, components
        (folder / "tasks.csv").write_text(TASKS_HEADER + "\n")
        (folder / "metrics.jsonl").write_text("")

    def log(self, result: Any, iteration: int, split: str, **extra: Any) -> None:
        from metacli.evaluation import task_rows

        seed = self.components.run.seed
        with (self.folder / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({**result.record(iteration, split), **extra}) + "\n")
        with (self.folder / "tasks.csv").open("a") as handle:
            handle.writelines(row + "\n" for row in task_rows(result, split, iteration, seed))

    def checkpoint(self, name: str, iteration: int, best: tuple[float | None, int]) -> None:
        from metacli.checkpoint import LoopState, make, save_checkpoint

        state = LoopState(iteration=iteration, best_metric=best[0], best_iteration=best[1])
        save_checkpoint(self.folder / "checkpoints" / f"{name}.pt", make(self.components, state))


def evaluate(components: Any, split: str, num_tasks: int) -> Any:
    from metacli.evaluation import evaluate as metacli_evaluate

    return metacli_evaluate(components, split, num_tasks, 100)


def gradient_gap(twin: Any, model: Any, names: Callable[[str], str], batch: Any) -> float:
    """metacli's meta-gradient on the same batch at the example's current weights, against
    the example's (already in ``.grad``): the largest difference relative to the largest
    component. (Trajectories are not compared: Adam divides each step by the gradient's
    own size, so a coordinate whose gradient is rounding noise, such as a linear bias
    before batch norm, takes steps of the full rate in either implementation.)"""
    copy_weights(twin.algorithm.model, model, names, into_example=False)
    twin.algorithm.zero_grad()
    twin.algorithm.meta_loss(batch).loss.backward()
    theirs = dict(model.named_parameters())
    gap, scale = 0.0, 0.0
    for name, p in twin.algorithm.model.named_parameters():
        reference = theirs[names(name)].grad
        gap = max(gap, float((p.grad - reference).abs().max()))
        scale = max(scale, float(reference.abs().max()))
    return gap / scale


def train_learn2learn(
    suite: str,
    seed: int,
    iterations: int,
    val_every: int,
    folder: Path,
    l2l_root: Path,
    metacli_tasks: bool = False,
    check_steps: int = 0,
) -> None:
    import learn2learn as l2l
    import numpy as np
    import torch

    from metacli.build import build
    from metacli.composition import compose
    from metacli.run_folder import config_of

    torch.set_num_threads(1)
    started_at = utc()
    overrides = run_overrides(suite, seed, iterations, val_every)
    components = build(compose("train", overrides))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ours = components.algorithm.model
    model = example_model(suite, components)
    names = mapping(suite)
    copy_weights(ours, model, names, into_example=True)  # the same initial weights
    recorder = Recorder(folder, components)
    spec = SUITES[suite]
    higher = suite != "sinusoid"
    best: tuple[float | None, int] = (None, 0)
    best_state = copy.deepcopy(model.state_dict())
    started, train_time, eval_time = time.perf_counter(), 0.0, 0.0
    twin = build(compose("train", overrides)) if check_steps else None
    gaps: list[float] = []

    def check(batch: Any, iteration: int) -> None:
        if twin is not None and iteration <= check_steps:
            gaps.append(gradient_gap(twin, model, names, batch))

    step = make_step(suite, model, components, l2l_root, seed, metacli_tasks, check)
    for iteration in range(1, iterations + 1):
        tick = time.perf_counter()
        loss, metric = step(iteration)
        train_time += time.perf_counter() - tick
        if iteration % 100 == 0 or iteration == 1:
            record = {"iteration": iteration, "split": "train", "loss": loss, "metric": metric}
            with (folder / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if iteration % val_every == 0 or iteration == iterations:
            tick = time.perf_counter()
            copy_weights(ours, model, names, into_example=False)
            result = evaluate(components, "val", spec.val_tasks)
            eval_time += time.perf_counter() - tick
            recorder.log(result, iteration, "val", wall_time=time.perf_counter() - started)
            value = result.final
            better = best[0] is None or (value > best[0] if higher else value < best[0])
            if math.isfinite(value) and better:
                best = (value, iteration)
                best_state = copy.deepcopy(model.state_dict())
                recorder.checkpoint("best", iteration, best)
            print(
                f"[learn2learn {suite} seed {seed}] iter {iteration}: val {value:.4f}", flush=True
            )
    recorder.checkpoint("last", iterations, best)
    tick = time.perf_counter()
    last = evaluate(components, "test", spec.test_tasks)
    recorder.log(last, iterations, "test", checkpoint="last")
    model.load_state_dict(best_state)
    copy_weights(ours, model, names, into_example=False)
    test = evaluate(components, "test", spec.test_tasks)
    recorder.log(test, iterations, "test", checkpoint="best")
    own = example_evaluation(suite, model, components, spec.test_tasks)
    eval_time += time.perf_counter() - tick
    config = config_of(components.cfg)
    implementation = "learn2learn on metacli's tasks" if metacli_tasks else "learn2learn"
    config["implementation"] = implementation
    summary = {
        "status": "finished",
        "command": "train",
        "run_dir": str(folder),
        "implementation": implementation,
        **({"meta_gradient_relative_gap": gaps} if gaps else {}),
        "learn2learn_version": l2l.__version__,
        "example": spec.example,
        "overrides": overrides,
        "config": config,
        "seed": seed,
        "torch_version": torch.__version__,
        "started_at": started_at,
        "finished_at": utc(),
        "iterations": iterations,
        "threads": 1,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - started,
        "best_val": {"metric": best[0], "iteration": best[1]},
        "test": {
            **test.as_dict(),
            "checkpoint": "best",
            "checkpoint_iteration": best[1],
            "last": last.as_dict(),
            "example_fast_adapt": own,
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"suite": suite, "seed": seed, "test": test.final, "example": own}))


def make_step(
    suite: str,
    model: Any,
    components: Any,
    l2l_root: Path,
    seed: int,
    metacli_tasks: bool = False,
    check: Callable[[Any, int], None] | None = None,
) -> Callable[[int], tuple[float, float]]:
    """One training iteration of the example's loop (its code, its order); with
    ``metacli_tasks`` (MAML, FOMAML, ProtoNets) on the meta-batches metacli's own run draws."""
    import learn2learn as l2l
    import torch
    from torch import nn

    from metacli.loop import sample

    cfg = components.cfg
    if suite in ("maml", "fomaml"):
        example = example_module(SUITES[suite].example)
        ways, shots = cfg.task.ways, cfg.task.shots
        tasks = None if metacli_tasks else omniglot_tasksets(components, l2l_root, ways, 2 * shots)
        maml = l2l.algorithms.MAML(model, lr=cfg.algo.inner_lr, first_order=suite == "fomaml")
        opt = torch.optim.Adam(maml.parameters(), cfg.optim.lr)
        loss = nn.CrossEntropyLoss(reduction="mean")
        batch_size = cfg.train.meta_batch_size

        def maml_step(iteration: int) -> tuple[float, float]:
            opt.zero_grad()
            error, accuracy = 0.0, 0.0
            stream = None if tasks is not None else sample(components)
            for i in range(batch_size):
                learner = maml.clone()
                if tasks is not None:
                    batch = tasks.sample()
                else:  # metacli's task i, laid out as the example's (support, query, ...)
                    assert stream is not None
                    sx, sy, qx, qy = (t[i] for t in stream.tensors())
                    data = torch.stack([sx, qx], 1).flatten(0, 1)
                    batch = (data, torch.stack([sy, qy], 1).flatten(0, 1))
                evaluation_error, evaluation_accuracy = example.fast_adapt(
                    batch, learner, loss, cfg.algo.inner_steps, shots, ways, "cpu"
                )
                evaluation_error.backward()
                error += evaluation_error.item()
                accuracy += evaluation_accuracy.item()
            for p in maml.parameters():
                p.grad.data.mul_(1.0 / batch_size)
            if check is not None and stream is not None:
                check(stream, iteration)
            opt.step()
            return error / batch_size, accuracy / batch_size

        return maml_step
    if suite == "protonet":
        example = example_module(SUITES[suite].example)
        shot, ways, queries = cfg.task.shots, cfg.task.ways, cfg.task.queries
        tasks = (
            None if metacli_tasks else omniglot_tasksets(components, l2l_root, ways, shot + queries)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)

        def proto_step(iteration: int) -> tuple[float, float]:
            model.train()
            stream = None if tasks is not None else sample(components)
            batch = tasks.sample() if tasks is not None else example_layout(stream, ways)
            loss, acc = example.fast_adapt(model, batch, ways, shot, queries, device="cpu")
            optimizer.zero_grad()
            loss.backward()
            if check is not None and stream is not None:
                check(stream, iteration)
            optimizer.step()
            if iteration % 100 == 0:  # the example's epochs of 100 episodes
                scheduler.step()
            return loss.item(), acc.item()

        return proto_step
    # sinusoid: examples/maml_sine.py's loop (torchmeta's Sinusoid is metacli's here)
    maml = l2l.algorithms.MAML(model, lr=cfg.algo.inner_lr, first_order=False, allow_unused=True)
    opt = torch.optim.Adam(maml.parameters(), cfg.optim.lr)
    lossfn = nn.MSELoss(reduction="mean")
    generator = torch.Generator().manual_seed(seed)
    task = components.task

    def sine_step(iteration: int) -> tuple[float, float]:
        if metacli_tasks:  # the meta-batches metacli's own run draws
            batch = sample(components)
        else:
            batch = task.sample(cfg.train.meta_batch_size, "train", generator)
        meta_train_loss = 0.0
        for i in range(len(batch)):
            learner = maml.clone()
            for _ in range(cfg.algo.inner_steps):
                learner.adapt(lossfn(learner(batch.support_x[i]), batch.support_y[i]))
            meta_train_loss += lossfn(learner(batch.query_x[i]), batch.query_y[i])
        meta_train_loss = meta_train_loss / len(batch)
        opt.zero_grad()
        meta_train_loss.backward()
        if check is not None:
            check(batch, iteration)
        opt.step()
        return float(meta_train_loss.item()), float(meta_train_loss.item())

    return sine_step


def example_layout(stream: Any, ways: int) -> tuple[Any, Any]:
    """metacli's episode (a meta-batch of one) as ``fast_adapt``'s (data, labels): each
    class's support images, then its queries. ``fast_adapt`` sorts the labels with an
    unstable sort and takes each class's first images as its shots, so the images are
    placed where that sort moves them back to this layout: the same shots as metacli's."""
    import torch

    sx, sy, qx, qy = (t[0] for t in stream.tensors())
    data = torch.cat([torch.cat([sx[sy == c], qx[qy == c]]) for c in range(ways)])
    labels = torch.cat([torch.cat([sy[sy == c], qy[qy == c]]) for c in range(ways)])
    order = torch.sort(labels).indices  # where fast_adapt's sort takes each image from
    placed = torch.empty_like(data)
    placed[order] = data
    return placed, labels


def example_evaluation(suite: str, model: Any, components: Any, num_tasks: int) -> dict[str, Any]:
    """The example's own adaptation (its fast_adapt) on metacli's fixed test tasks: the
    mean final metric, for a check of metacli's evaluator on the same weights."""
    import learn2learn as l2l
    import torch
    from torch import nn

    from metacli.evaluation import fixed_tasks

    cfg = components.cfg
    tasks = fixed_tasks(components, "test", num_tasks)
    values: list[float] = []
    if suite in ("maml", "fomaml"):
        example = example_module(SUITES[suite].example)
        maml = l2l.algorithms.MAML(model, lr=cfg.algo.inner_lr)
        for i in range(len(tasks)):
            sx, sy, qx, qy = (t[i] for t in tasks.tensors())
            data = torch.stack([sx, qx], 1).flatten(0, 1)  # support, query, support, ...
            labels = torch.stack([sy, qy], 1).flatten(0, 1)
            steps = cfg.algo.test_inner_steps or cfg.algo.inner_steps
            _, accuracy = example.fast_adapt(
                (data, labels),
                maml.clone(),
                nn.CrossEntropyLoss(),
                steps,
                cfg.task.shots,
                cfg.task.ways,
                "cpu",
            )
            values.append(accuracy.item())
    elif suite == "protonet":
        example = example_module(SUITES[suite].example)
        model.eval()
        with torch.no_grad():
            for i in range(len(tasks)):
                sx, sy, qx, qy = (t[i] for t in tasks.tensors())
                # fast_adapt's own torch.sort is not stable: on a given task it can take a
                # query image for a class's shot, so its distance and accuracy are used on
                # the task as laid out
                ways = int(sy.max()) + 1
                embeddings = model(sx)
                prototypes = torch.stack([embeddings[sy == c].mean(dim=0) for c in range(ways)])
                logits = example.pairwise_distances_logits(model(qx), prototypes)
                accuracy = example.accuracy(logits, qy)
                values.append(accuracy.item())
    else:
        maml = l2l.algorithms.MAML(model, lr=cfg.algo.inner_lr, allow_unused=True)
        lossfn = nn.MSELoss()
        for i in range(len(tasks)):
            sx, sy, qx, qy = (t[i] for t in tasks.tensors())
            learner = maml.clone()
            for _ in range(cfg.algo.test_inner_steps):
                learner.adapt(lossfn(learner(sx), sy))
            with torch.no_grad():
                values.append(lossfn(learner(qx), qy).item())
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": sum(finite) / max(len(finite), 1),
        "num_tasks": len(values),
        "diverged_tasks": len(values) - len(finite),
    }


# --- the report -----------------------------------------------------------------------


def curves(folder: Path) -> list[tuple[int, float]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(r["iteration"], r["metric"]) for r in records if r.get("split") == "val"]


def report(out: Path, suites: list[str], figure: Path) -> str:
    """Per suite: each implementation's meta-test per seed, their mean and spread, its
    training seconds per iteration, and compare's paired difference (metacli minus
    learn2learn, per task within a seed, then over seeds); the validation curves drawn
    into ``figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import metacli

    shown = [s for s in suites if (out / s).is_dir()]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    lines = [
        "| suite | implementation | meta-test per seed | mean | s / iteration "
        "| metacli - learn2learn (paired) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for axis, suite in zip(axes[0], shown, strict=True):
        rows = metacli.compare(
            [out / suite], group_by="implementation", baseline=["implementation=learn2learn"]
        )
        kinds = (
            ("metacli", "tab:blue", "metacli"),
            ("learn2learn", "tab:orange", "learn2learn"),
            ("learn2learn_metacli_tasks", "tab:green", "learn2learn on metacli's tasks"),
        )
        for implementation, colour, label in kinds:
            folders = sorted((out / suite / implementation).glob("seed*"))
            folders = [f for f in folders if (f / "summary.json").is_file()]
            if not folders:
                continue
            summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
            tests = [s["test"]["mean"] for s in summaries]
            per_iteration = [s["train_time_s"] / s["iterations"] for s in summaries]
            runs = [curves(f) for f in folders]
            steps = [i for i, _ in runs[0]]
            values = [[v for _, v in run] for run in runs if len(run) == len(steps)]
            mean = [sum(c) / len(c) for c in zip(*values, strict=True)]
            axis.plot(steps, mean, color=colour, label=f"{label} ({len(values)} seeds)")
            axis.fill_between(
                steps,
                [min(c) for c in zip(*values, strict=True)],
                [max(c) for c in zip(*values, strict=True)],
                color=colour,
                alpha=0.2,
            )
            row = next((r for r in rows if (r["implementation"] or "metacli") == label), {})
            paired = "-"
            if row.get("difference") is not None:
                paired = f"{row['difference']:+.4f} ± {row['difference_ci95']:.4f}"
                paired += f" ({row['pairs']} {row['pairs_of']})"
            scale = 100 if suite != "sinusoid" else 1
            unit = " %" if suite != "sinusoid" else ""
            per_seed = " / ".join(f"{scale * t:.2f}" for t in tests)
            p_value = f"{row['p_value']:.3f}" if row.get("p_value") is not None else "-"
            mean_test = scale * sum(tests) / len(tests)
            lines.append(
                f"| {suite} | {label} | {per_seed}{unit} | {mean_test:.2f}{unit} "
                f"| {sum(per_iteration) / len(per_iteration):.3f} | {paired} | {p_value} |"
            )
        axis.set_title(suite)
        axis.set_xlabel("iteration")
        axis.set_ylabel("validation MSE" if suite == "sinusoid" else "validation accuracy")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    return "\n".join(lines) + "\n"


def running_statistics(folder: Path, episodes: int) -> dict[str, float]:
    """A ProtoNets run's meta-test with its batch norm's running statistics as PyTorch
    (and the example) accumulates them: momentum 0.1 over the support and query images of
    ``episodes`` training episodes (metacli's own: the support images alone, after each
    outer step)."""
    import torch

    from metacli.checkpoint import components_from
    from metacli.evaluation import evaluate as metacli_evaluate
    from metacli.loop import sample

    torch.set_num_threads(1)
    components, _ = components_from(folder / "checkpoints" / "best.pt")  # weights loaded
    model = components.algorithm.model
    before = metacli_evaluate(components, "test", 600, 100).final
    layers = model.norm_layers()
    for layer in layers:
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0)
    with torch.no_grad():
        for _ in range(episodes):
            batch = sample(components)
            images = torch.cat([batch.support_x[0], batch.query_x[0]])
            for layer in layers:
                layer.collect = True
            try:
                model(images)
            finally:
                for layer in layers:
                    layer.collect = False
    after = metacli_evaluate(components, "test", 600, 100).final
    return {"metacli_statistics": before, "support_and_query_statistics": after}


# --- the driver -----------------------------------------------------------------------


def job_command(
    implementation: str, suite: str, seed: int, args: argparse.Namespace, folder: Path
) -> list[str]:
    if implementation == "metacli":
        overrides = run_overrides(suite, seed, args.iterations, args.val_every)
        return [sys.executable, "-m", "metacli", "train", *overrides, f"hydra.run.dir={folder}"]
    return [
        sys.executable,
        __file__,
        "--job",
        suite,
        str(seed),
        str(folder),
        "--iterations",
        str(args.iterations),
        "--val-every",
        str(args.val_every),
        "--l2l-root",
        str(args.l2l_root),
        *(["--metacli-tasks"] if implementation == "learn2learn_metacli_tasks" else []),
        "--check-steps",
        str(args.check_steps),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "parity")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--only", choices=["metacli", "learn2learn"])
    parser.add_argument("--l2l-root", type=Path, default=Path("/tmp/l2l-omniglot"))
    parser.add_argument(
        "--metacli-tasks",
        action="store_true",
        help="learn2learn's loop on metacli's meta-batches (maml, fomaml, sinusoid)",
    )
    parser.add_argument(
        "--check-steps", type=int, default=0, help="compare with metacli's step this many times"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FIGURE.png",
        help="the table of the finished runs, and their curves into FIGURE.png",
    )
    parser.add_argument(
        "--running-statistics",
        type=Path,
        metavar="RUN",
        help="a ProtoNets run meta-tested with statistics from support and query images",
    )
    parser.add_argument(
        "--job", nargs=3, metavar=("SUITE", "SEED", "FOLDER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.job:
        suite, seed, folder = args.job
        train_learn2learn(
            suite,
            int(seed),
            args.iterations,
            args.val_every,
            Path(folder),
            args.l2l_root,
            args.metacli_tasks,
            args.check_steps,
        )
        return
    if args.running_statistics:
        print(json.dumps(running_statistics(args.running_statistics, 200)))
        return
    if args.report:
        print(report(args.out, args.suites, args.report))
        return
    implementations = [args.only] if args.only else ["learn2learn", "metacli"]
    if args.metacli_tasks:  # learn2learn's loop on metacli's meta-batches, in a folder of its own
        implementations = [
            "learn2learn_metacli_tasks" if i == "learn2learn" else i for i in implementations
        ]
    queue = [
        (implementation, suite, seed)
        for suite in args.suites
        for seed in args.seeds
        for implementation in implementations
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen[bytes], str, float]] = []
    failed = []
    while queue or running:
        while queue and len(running) < args.jobs:
            implementation, suite, seed = queue.pop(0)
            folder = args.out / suite / implementation / f"seed{seed}"
            log = args.out / suite / f"{implementation}_seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = job_command(implementation, suite, seed, args, folder)
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                )
            running.append((process, str(log), time.perf_counter()))
            print(f"{utc()} started {implementation} {suite} seed {seed}: {log}", flush=True)
        time.sleep(2)
        for entry in list(running):
            process, log, began = entry
            if process.poll() is not None:
                running.remove(entry)
                took = time.perf_counter() - began
                print(f"{utc()} {log}: exit {process.returncode} after {took:.0f} s", flush=True)
                if process.returncode:
                    failed.append(log)
    if failed:
        sys.exit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
