"""Every paper preset at its full budget, one after the other, and the rows of
docs/RESULTS.md from their run folders; first, each preset's hours on this device.

    python benchmarks/reproduce.py --estimate                  # the estimates alone
    python benchmarks/reproduce.py --data omniglot=../shared/data/omniglot \\
        --data miniimagenet=/data/mini-imagenet [--presets maml_omniglot_5w1s ...]
    python benchmarks/reproduce.py --rows                      # the table from the run folders

A paper preset is an ``experiment=`` preset (all but ``*_cpu``); its ``published:``
block, where it has one, gives the table's published number. The estimate of a
preset times a few of its meta-iterations (after two not timed) and the adaptation of a few
of its validation tasks on this device, with the preset's own settings, and adds up its
iterations, validations and meta-tests (the ensemble's and the last weights' included). A
preset whose data is not given is timed on the synthetic stand-in of its image size, ways,
shots and queries (the same work per iteration; the estimate says so). Runs go to
``<out>/<preset>/`` (an unfinished one is resumed, a finished one kept), one at a time on
``--device``; the rows, with each run's command and measured hours, go to ``--table``
(default docs/results_reproduced.md) and stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SHAPES = {  # the stand-in for a dataset that is not given: (channels, size)
    "omniglot": (1, 28),
    "miniimagenet": (3, 84),
    "tieredimagenet": (3, 84),
    "cub": (3, 84),
    "cifarfs": (3, 32),
    "fc100": (3, 32),
}
DROPPED = (
    "normalize",
    "train_classes",
    "augment",
    "split",
    "resize",
    "rotations",
    "test_rotations",
    "random_sizes",
    "boxes",
    "split_dir",
    "split_seed",
)


def paper_presets() -> list[str]:
    """The experiment presets that set up a paper's experiment, by name: all but the
    ones made for this CPU (``*_cpu``)."""
    folder = ROOT / "conf" / "experiment"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.endswith("_cpu"))


def preset_config(preset: str, extra: list[str]) -> Any:
    from metacli.composition import compose

    return compose("train", [f"experiment={preset}", *extra])


def data_overrides(cfg: Any, data: dict[str, str]) -> tuple[list[str], bool]:
    """The data.root (and cross-domain data_root) settings of a preset, and whether all
    its data was given."""
    overrides, complete = [], True
    name = str(cfg.task.name)
    if name in IMAGE_SHAPES:
        if name in data:
            overrides.append(f"data.root={data[name]}")
        else:
            complete = False
    for split in ("val", "test"):
        other = cfg.get(split, {}).get("task")
        if other:
            if other in data:
                overrides.append(f"{split}.data_root={data[other]}")
            else:
                complete = False
    return overrides, complete


def standin(preset: str, cfg: Any) -> list[str]:
    """The synthetic task of the preset's image shape and episode sizes (the preset's own
    task settings that the synthetic task lacks left out)."""
    from dataclasses import fields

    from metacli.tasks.synthetic import SyntheticConfig

    channels, size = IMAGE_SHAPES[str(cfg.task.name)]
    classes = max(int(cfg.task.ways), int(cfg.task.get("test_ways") or 0), 5) * 4
    out = ["task=synthetic", f"task.image_size={size}", f"task.channels={channels}"]
    out += [f"task.classes={classes}"]
    out += [f"~{split}.task" for split in ("val", "test") if cfg.get(split, {}).get("task")]
    merged = preset_config(preset, out)
    known = {f.name for f in fields(SyntheticConfig)}
    return [*out, *(f"~task.{key}" for key in merged.task if key not in known)]


def estimate(preset: str, data: dict[str, str], device: str, timed: int) -> dict[str, Any]:
    """Seconds per meta-iteration and per validation task of the preset on ``device``,
    and the hours its full budget takes."""
    import torch

    from metacli.build import build
    from metacli.evaluation import evaluate
    from metacli.loop import meta_step

    cfg = preset_config(preset, [])
    given, complete = data_overrides(cfg, data)
    stand_in = not complete and str(cfg.task.name) in IMAGE_SHAPES
    overrides = [f"device={device}", *(standin(preset, cfg) if stand_in else given)]
    components = build(preset_config(preset, overrides))
    sync = torch.cuda.synchronize if components.device.type == "cuda" else (lambda: None)
    for _ in range(2):  # not timed: allocation, autotuning, caches
        meta_step(components, None)
    sync()
    start = time.perf_counter()
    for _ in range(timed):
        meta_step(components, None)
    sync()
    per_iteration = (time.perf_counter() - start) / timed
    tasks = 20
    start = time.perf_counter()
    evaluate(components, "val", tasks, tasks)
    sync()
    per_task = (time.perf_counter() - start) / tasks
    run = cfg  # the preset's own budget (the stand-in's settings do not change it)
    iterations = int(run.train.iterations)
    validations = iterations // max(int(run.train.val_every), 1)
    tests = 1 + int(bool(run.test.get("report_last"))) + int(bool(run.test.get("ensemble_top_k")))
    seconds = (
        iterations * per_iteration
        + validations * int(run.val.num_tasks) * per_task
        + tests * int(run.test.num_tasks) * per_task
    )
    del components
    gc.collect()
    return {
        "preset": preset,
        "device": device_name(device),
        "s_per_iteration": per_iteration,
        "s_per_eval_task": per_task,
        "iterations": iterations,
        "hours": seconds / 3600,
        "stand_in": stand_in,
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def command(preset: str, data: dict[str, str], device: str, folder: Path) -> list[str]:
    given, _ = data_overrides(preset_config(preset, []), data)
    summary = folder / "summary.json"
    if summary.is_file():  # unfinished: continue it exactly
        return [sys.executable, "-m", "metacli", "train", f"resume={folder}"]
    return [
        sys.executable,
        "-m",
        "metacli",
        "train",
        f"experiment={preset}",
        *given,
        f"device={device}",
        f"hydra.run.dir={folder}",
    ]


def finished(folder: Path) -> bool:
    path = folder / "summary.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("status") == "finished"


def metric_text(section: dict[str, Any]) -> str:
    mean, ci95 = section.get("mean"), section.get("ci95")
    if mean is None:
        return "-"
    if section.get("metric_name") == "accuracy":
        return f"{100 * mean:.2f} ± {100 * (ci95 or 0):.2f} %"
    return f"{mean:.3f} ± {ci95 or 0:.3f}"


def rows(out: Path, presets: list[str]) -> str:
    """The docs/RESULTS.md rows of the finished runs in ``out``: each labelled a
    paper-budget run, with its number, the ensemble's where tested, the published number,
    its command and its hours."""
    lines = [
        "| preset | run | metacli (best validation) | top-k ensemble | published | hours "
        "| device |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        folder = out / preset
        if not finished(folder):
            continue
        summary = json.loads((folder / "summary.json").read_text())
        published = summary.get("config", {}).get("published") or {}
        value = published.get("value")
        paper = "-" if value is None else f"{100 * value:.2f} %" if value <= 1 else f"{value}"
        ensemble = summary.get("test_ensemble") or {}
        overrides = " ".join(summary.get("overrides") or [])
        lines.append(
            f"| `{preset}` | paper-budget: `metacli train {overrides}` "
            f"| {metric_text(summary.get('test') or {})} | {metric_text(ensemble)} | {paper} "
            f"| {float(summary.get('wall_time_s') or 0) / 3600:.1f} | {summary.get('device')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", help="default: every paper preset")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET=PATH")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "reproduce")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "results_reproduced.md")
    parser.add_argument("--estimate", action="store_true", help="print the estimates alone")
    parser.add_argument("--rows", action="store_true", help="write the table alone")
    parser.add_argument("--timed", type=int, default=5, help="meta-iterations timed per preset")
    args = parser.parse_args()
    data = dict(item.split("=", 1) for item in args.data)
    presets = args.presets or paper_presets()
    unknown = sorted(set(presets) - set(paper_presets()))
    if unknown:
        sys.exit(f"not paper presets: {', '.join(unknown)} (see conf/experiment/)")
    if not args.rows:
        total = 0.0
        print("| preset | s / iteration | s / eval task | iterations | hours | device |")
        print("|---|---|---|---|---|---|")
        for preset in presets:
            if finished(args.out / preset) and not args.estimate:
                continue
            found = estimate(preset, data, args.device, args.timed)
            total += found["hours"]
            note = " (stand-in data)" if found["stand_in"] else ""
            print(
                f"| `{preset}`{note} | {found['s_per_iteration']:.3f} "
                f"| {found['s_per_eval_task']:.3f} | {found['iterations']} "
                f"| {found['hours']:.2f} | {found['device']} |",
                flush=True,
            )
        print(f"\ntotal: {total:.1f} hours on this device")
        if args.estimate:
            return
        for preset in presets:
            folder = args.out / preset
            if finished(folder):
                continue
            cfg = preset_config(preset, [])
            if not data_overrides(cfg, data)[1] and str(cfg.task.name) in IMAGE_SHAPES:
                print(f"{preset}: skipped, its data is not given (--data)", flush=True)
                continue
            folder.parent.mkdir(parents=True, exist_ok=True)
            code = subprocess.call(command(preset, data, args.device, folder), cwd=ROOT)
            print(f"{preset}: exit {code}", flush=True)
    table = rows(args.out, presets)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
