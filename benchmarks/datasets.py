"""The cost of the new datasets' pipeline on each one's standard workload.

For CIFAR-FS, FC100, tieredImageNet and CUB: a release written in its exact layout with
random pixels (CIFAR-100 and CUB at their real sizes, tieredImageNet at a stated share),
then
- decoding it into the cache: with every core, and (where images are compressed: CUB's
  JPEGs, tieredImageNet's PNG pickles) with one process, for the speed-up;
- sampling a meta-batch of the workload's preset (task.augment included), against one
  meta-iteration of that preset (``metacli.loop.meta_step``) on this CPU, or for CUB (a
  meta-test distribution) against adapting the meta-test batch.

    python benchmarks/datasets.py            # writes docs/benchmarks_datasets.md
    python benchmarks/datasets.py --quick    # smaller releases, fewer rounds
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.release_fixtures import COARSE_NAMES, FINE_NAMES  # noqa: E402

from metacli.build import build  # noqa: E402
from metacli.composition import compose  # noqa: E402
from metacli.loop import meta_step, sample  # noqa: E402
from metacli.tasks import images  # noqa: E402


def cifar_release(root: Path) -> None:
    """cifar-100-python/ at its real size: 50,000 + 10,000 images of 100 classes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, per_class in (("train", 500), ("test", 100)):
        fine = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        value = {
            b"data": data,
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
        }
        (folder / part).write_bytes(pickle.dumps(value, protocol=2))
    meta = {
        b"fine_label_names": [n.encode() for n in FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def cub_release(root: Path, classes: int, per_class: int) -> None:
    """CUB_200_2011/images/ with JPEGs of CUB's typical 500 x 375 size, and images.txt."""
    folder = root / "CUB_200_2011"
    rng = np.random.default_rng(1)
    lines, image_id = [], 0
    smooth = rng.integers(0, 256, size=(375 // 25, 500 // 25, 3), dtype=np.uint8)
    base = Image.fromarray(smooth).resize((500, 375), Image.Resampling.BILINEAR)
    for c in range(classes):
        name = f"{c + 1:03d}.Bird_{c}"
        (folder / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            image_id += 1
            relative = f"{name}/Bird_{c}_{i}.jpg"
            base.rotate(i % 360).save(folder / "images" / relative, quality=90)
            lines.append(f"{image_id} {relative}")
    (folder / "images.txt").write_text("\n".join(lines) + "\n")


def tiered_release(root: Path, form: str, share: float) -> int:
    """tieredImageNet's files with share x its real image count per split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    total = 0
    for split, classes, count in (
        ("train", 351, 448695),
        ("val", 97, 124261),
        ("test", 160, 206209),
    ):
        n = max(classes * 20, int(count * share))
        labels = np.arange(n) % classes
        images = rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8)
        if form == "png":
            pngs = []
            for image in images:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                pngs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
            (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=2))
        else:
            np.savez(root / f"{split}_images.npz", images=images)
        names = [f"n{c:08d}".encode() for c in range(classes)]
        value = {b"label_specific": labels, b"label_specific_str": names}
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(value, protocol=2))
        total += n
    return total


def timed(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_seconds(task: str, root: Path, workers: int | None) -> float:
    """Seconds to build the cache from scratch with ``workers`` processes."""
    cache = Path(tempfile.mkdtemp(prefix="metacli-bench-cache-"))
    original = images.os.cpu_count
    if workers is not None:
        images.os.cpu_count = lambda: workers  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        compose_build(
            f"task={task}", f"data.root={root}", f"data.cache_dir={cache}", "task.queries=2"
        )
        return time.perf_counter() - start
    finally:
        images.os.cpu_count = original  # type: ignore[assignment]


def compose_build(*overrides: str) -> Any:
    return build(compose("train", ["device=cpu", "threads=1", *overrides]))


def workload(
    preset: str, root: Path, cache: Path, rounds: int, evaluate: bool = False
) -> dict[str, Any]:
    """Median seconds to sample a meta-batch of ``preset`` and to run one meta-iteration
    (or, ``evaluate``, to adapt the meta-test batch)."""
    overrides = [f"experiment={preset}", f"data.cache_dir={cache}"]
    if evaluate:
        overrides += [
            f"data.root={MINI_STANDIN}",
            f"test.data_root={root}",
            f"val.data_root={root}",
        ]
    else:
        overrides += [f"data.root={root}"]
    components = compose_build(*overrides)
    if evaluate:
        from metacli.evaluation import fixed_tasks

        count = components.run.test.batch_size
        draw = lambda: fixed_tasks(components, "test", count)  # noqa: E731
        batch = draw()
        components.algorithm.eval()
        step = timed(lambda: components.algorithm.evaluate(batch), 1)
        return {"sample_s": timed(draw, rounds), "step_s": step, "tasks": count}
    meta_step(components, None)  # warm-up
    size = components.run.train.meta_batch_size
    return {
        "sample_s": timed(lambda: sample(components), rounds),
        "step_s": timed(lambda: meta_step(components, None), 2),
        "tasks": size,
    }


MINI_STANDIN = Path()  # set in main: mini-ImageNet-shaped pickles for the CUB workload


def mini_pickles(root: Path) -> None:
    """mini-ImageNet's pickle layout with random pixels (the training side of mini -> CUB)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, classes in (("train", 64), ("val", 16), ("test", 20)):
        data = rng.integers(0, 256, size=(classes * 20, 84, 84, 3), dtype=np.uint8)
        table = {f"n{split}{c:05d}": list(range(c * 20, (c + 1) * 20)) for c in range(classes)}
        value = {"image_data": data, "class_dict": table}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(value, protocol=4))


def main() -> None:
    global MINI_STANDIN
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small releases, one round")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_datasets.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    share = 0.005 if args.quick else 0.05
    cub_classes, cub_per = (20, 20) if args.quick else (200, 59)
    rounds = 3 if args.quick else 10
    lines = [
        "<!-- written by python benchmarks/datasets.py -->",
        f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {platform.node()} "
        f"({os.cpu_count()} cores, torch {torch.__version__}, one torch thread); random "
        f"pixels in each release's exact layout.",
        "",
        "| dataset | release | images | decode, all cores | decode, 1 process |",
        "|---|---|---|---|---|",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="metacli-bench-") as tmp:
        base = Path(tmp)
        cifar = base / "cifar"
        cifar_release(cifar)

        def decoded(task: str, root: Path, release: str, count: int, single: bool) -> None:
            parallel = f"{decode_seconds(task, root, None):.1f} s"
            alone = f"{decode_seconds(task, root, 1):.1f} s" if single else "-"
            lines.append(f"| {task} | {release} | {count:,} | {parallel} | {alone} |")

        decoded("cifarfs", cifar, "cifar-100-python/", 60000, single=False)
        cub = base / "cub"
        cub_release(cub, cub_classes, cub_per)
        decoded("cub", cub, "CUB_200_2011/, JPEGs 500 x 375", cub_classes * cub_per, True)
        png, npz = base / "tiered_png", base / "tiered_npz"
        count = tiered_release(png, "png", share)
        tiered_release(npz, "npz", share)
        part = f"{100 * share:g}% of the images"
        decoded("tieredimagenet", png, f"PNG pickles ({part})", count, single=True)
        decoded("tieredimagenet", npz, f".npz ({part})", count, single=False)
        MINI_STANDIN = base / "mini"
        mini_pickles(MINI_STANDIN)
        cache = base / "cache"
        for preset, root in (
            ("metaoptnet_cifarfs_5w5s", cifar),
            ("protonet_cifarfs_5w1s", cifar),
            ("metaoptnet_ridge_fc100_5w5s", cifar),
            ("protonet_tieredimagenet_5w5s", npz),
            ("maml_tieredimagenet_5w1s", npz),
        ):
            rows.append((preset, workload(preset, root, cache, rounds)))
        rows.append(
            (
                "protonet_miniimagenet_cub_5w5s (meta-test)",
                workload("protonet_miniimagenet_cub_5w5s", cub, cache, rounds, evaluate=True),
            )
        )
    lines += [
        "",
        "| preset (workload) | tasks | sample a batch | meta-iteration (or adaptation) | share |",
        "|---|---|---|---|---|",
    ]
    for preset, r in rows:
        lines.append(
            f"| {preset} | {r['tasks']} | {1e3 * r['sample_s']:.1f} ms | {r['step_s']:.2f} s | "
            f"{100 * r['sample_s'] / r['step_s']:.2f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
