"""tieredImageNet, CIFAR-FS, FC100 and CUB from fixtures in each release's exact layout,
their damaged variants, a malicious pickle, cross-domain meta-testing and augmentation."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metacli.build import build
from metacli.errors import ConfigError, MetacliError
from metacli.streams import task_keys
from metacli.tasks.cifarfs import SPLIT_CLASSES, CifarFS, CifarFSConfig
from metacli.tasks.cub import CUB, CUBConfig, closer_look_split
from metacli.tasks.fc100 import FC100, SPLIT_SUPERCLASSES, FC100Config
from metacli.tasks.images import DRAWS, augment, decode_many
from metacli.tasks.tieredimagenet import TieredImageNet, TieredImageNetConfig
from tests.conftest import compose_config, read_summary, run_cli
from tests.release_fixtures import (
    COARSE_NAMES,
    FINE_NAMES,
    Evil,
    cifar100_release,
    class_images,
    cub_release,
    split_pickles,
    tiered_release,
)

EPISODE = {"ways": 3, "shots": 1, "queries": 2}


def cifarfs(root: Path, cache: Path, **kwargs: object) -> CifarFS:
    return CifarFS(CifarFSConfig(**{**EPISODE, **kwargs}), str(root), str(cache))  # type: ignore[arg-type]


def fine_ids(split: str) -> list[int]:
    return [FINE_NAMES.index(n) for n in SPLIT_CLASSES[split]]


# --- CIFAR-FS and FC100 -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "archive", "metaoptnet", "rfs"])
def test_cifarfs_reads_every_layout_with_the_authors_split(tmp_path: Path, form: str) -> None:
    root = tmp_path / "data"
    if form in ("folder", "archive"):
        cifar100_release(root, archive=form == "archive")
    else:
        split_pickles(root, "CIFAR_FS", {s: fine_ids(s) for s in SPLIT_CLASSES})
        if form == "rfs":  # RFS names the same pickles {split}.pickle
            for split in SPLIT_CLASSES:
                (root / f"CIFAR_FS_{split}.pickle").rename(root / f"{split}.pickle")
    task = cifarfs(root, tmp_path / "cache")
    assert {s: len(c) for s, c in task.splits.items()} == {"train": 64, "val": 16, "test": 20}
    test_classes = task.splits["test"]
    names = (
        test_classes.names
        if form in ("folder", "archive")
        else [FINE_NAMES[int(n)] for n in test_classes.names]
    )
    assert sorted(names) == sorted(SPLIT_CLASSES["test"])
    # the class "baby": its six images, pixel for pixel, from whichever layout
    k = names.index("baby")
    got = task.images[test_classes.indices[k, : test_classes.counts[k]]]
    expected = torch.from_numpy(class_images(FINE_NAMES.index("baby"), 6, 32, 0)).permute(
        0, 3, 1, 2
    )
    assert torch.equal(got, expected)
    episode = task.sample(2, "test", torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (2, 3, 3, 32, 32) and episode.query_x.shape == (
        2,
        6,
        3,
        32,
        32,
    )


def test_fc100_splits_by_superclass(tmp_path: Path) -> None:
    release = cifar100_release(tmp_path / "data", archive=True)
    task = FC100(FC100Config(**EPISODE), str(release.parent), str(tmp_path / "cache"))  # type: ignore[arg-type]
    assert task.layout == "python release archive"
    for split, superclasses in SPLIT_SUPERCLASSES.items():
        coarse = {COARSE_NAMES.index(n) for n in superclasses}
        # the fixture puts fine class f in superclass f // 5
        assert task.splits[split].names == [FINE_NAMES[f] for f in range(100) if f // 5 in coarse]
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    pickled = tmp_path / "pickles"
    split_pickles(
        pickled,
        "FC100",
        {"train": list(range(60)), "val": list(range(60, 80)), "test": list(range(80, 100))},
    )
    task = FC100(FC100Config(**EPISODE), str(pickled), str(tmp_path / "cache"))  # type: ignore[arg-type]
    assert task.layout == "pickles" and task.splits["val"].names == [str(c) for c in range(60, 80)]


def test_cifar_damaged_and_missing_parts_are_named(tmp_path: Path) -> None:
    folder = cifar100_release(tmp_path / "data")
    cache = tmp_path / "cache"
    meta = (folder / "meta").read_bytes()
    (folder / "meta").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(MetacliError, match=r"Cannot read .*cifar-100-python/meta: it is damaged"):
        cifarfs(tmp_path / "data", cache)
    (folder / "meta").unlink()
    with pytest.raises(MetacliError, match=r"lacks the file 'meta'"):
        cifarfs(tmp_path / "data", cache)
    (folder / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [b"apple"], b"coarse_label_names": []}, protocol=2)
    )
    with pytest.raises(MetacliError, match="does not name the class"):
        cifarfs(tmp_path / "data", cache)
    archive = tmp_path / "gz" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(MetacliError, match=r"cifar-100-python.tar.gz: it is damaged"):
        cifarfs(archive.parent, cache)
    with tarfile.open(archive, "w:gz") as tar:  # a .tar.gz of something else
        tar.add(tmp_path / "data" / "cifar-100-python" / "train", arcname="other/train")
    with pytest.raises(MetacliError, match="has no cifar-100-python/train"):
        cifarfs(archive.parent, cache)
    with pytest.raises(MetacliError, match=r"No CIFAR-100 found.*CIFAR_FS_train\.pickle"):
        cifarfs(tmp_path / "nothing", cache)
    pickled = tmp_path / "pickles"
    split_pickles(pickled, "CIFAR_FS", {s: fine_ids(s) for s in SPLIT_CLASSES})
    (pickled / "CIFAR_FS_test.pickle").rename(tmp_path / "moved")
    with pytest.raises(MetacliError, match=r"split pickles but not CIFAR_FS_test\.pickle"):
        cifarfs(pickled, cache)
    (tmp_path / "moved").rename(pickled / "CIFAR_FS_test.pickle")
    with open(pickled / "CIFAR_FS_val.pickle", "wb") as handle:
        pickle.dump({"data": np.zeros((3, 32, 32, 3), np.uint8), "labels": [1, 2]}, handle)
    with pytest.raises(MetacliError, match=r"CIFAR_FS_val.pickle has 3 images but 2 labels"):
        cifarfs(pickled, cache)


def test_a_class_missing_from_a_partial_release_is_left_out_and_reported(tmp_path: Path) -> None:
    folder = cifar100_release(tmp_path / "data")
    baby = FINE_NAMES.index("baby")
    for part in ("train", "test"):
        data = pickle.loads((folder / part).read_bytes(), encoding="bytes")
        keep = [i for i, label in enumerate(data[b"fine_labels"]) if label != baby]
        for key in (b"fine_labels", b"coarse_labels", b"filenames"):
            data[key] = [data[key][i] for i in keep]
        data[b"data"] = data[b"data"][keep]
        (folder / part).write_bytes(pickle.dumps(data, protocol=2))
    task = cifarfs(tmp_path / "data", tmp_path / "cache")
    assert len(task.splits["test"]) == 19 and "baby" not in task.splits["test"].names
    assert any("class baby has no images" in p for p in task.problems)


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickled = tmp_path / "pickles"
    split_pickles(pickled, "FC100", {"train": [0, 1, 2], "val": [3, 4, 5], "test": [6, 7, 8]})
    (pickled / "FC100_train.pickle").write_bytes(pickle.dumps({"data": Evil(marker), "labels": []}))
    with pytest.raises(
        MetacliError, match=r"Refused to load .*FC100_train.pickle: it names (posix|os)\.system"
    ):
        FC100(FC100Config(**EPISODE), str(pickled), str(tmp_path / "c"))  # type: ignore[arg-type]
    tiered = tmp_path / "tiered"
    tiered_release(tiered, "npz")
    (tiered / "val_labels.pkl").write_bytes(pickle.dumps(Evil(marker), protocol=2))
    result = run_cli(
        *("data", "check", "task=tieredimagenet", f"data.root={tiered}", "task.queries=2"),
        f"data.cache_dir={tmp_path / 'c'}",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "Refused to load" in result.stdout and "val_labels.pkl" in result.stdout
    assert not marker.exists()


# --- tieredImageNet -------------------------------------------------------------------------


def test_tiered_png_pickles_and_npz_give_the_same_pixels(tmp_path: Path) -> None:
    written = tiered_release(tmp_path / "png", "png")
    tiered_release(tmp_path / "npz" / "tiered-imagenet", "npz")  # the subfolder is found too
    config = TieredImageNetConfig(**EPISODE)  # type: ignore[arg-type]
    png = TieredImageNet(config, str(tmp_path / "png"), str(tmp_path / "c"))
    npz = TieredImageNet(config, str(tmp_path / "npz"), str(tmp_path / "c"))
    assert (png.layout, npz.layout) == ("png pickles", "npz")
    for split, array in written.items():
        expected = torch.from_numpy(array).permute(0, 3, 1, 2)
        assert torch.equal(png.images_of(split), expected)
        assert torch.equal(npz.images_of(split), expected)
    assert png.splits["val"].names == ["n00000004", "n00000005", "n00000006"]
    assert png.decoded() == 50
    episode = png.sample(2, "test", torch.Generator().manual_seed(0))
    # every test image comes from the test split's own tensor: its classes' colours
    assert episode.query_x.shape == (2, 6, 3, 84, 84)


def test_tiered_damaged_parts_are_named(tmp_path: Path) -> None:
    config = TieredImageNetConfig(**EPISODE)  # type: ignore[arg-type]
    root = tmp_path / "png"
    tiered_release(root, "png")
    with open(root / "train_images_png.pkl", "rb") as handle:
        images = pickle.load(handle)
    images[3] = np.frombuffer(b"\x89PNG broken", dtype=np.uint8)
    with open(root / "train_images_png.pkl", "wb") as handle:
        pickle.dump(images, handle, protocol=2)
    with pytest.raises(MetacliError, match=r"Cannot read the image 3 of .*train_images_png.pkl"):
        TieredImageNet(config, str(root), str(tmp_path / "c"))
    (root / "train_images_png.pkl").unlink()
    with pytest.raises(MetacliError, match=r"lacks train_images_png.pkl"):
        TieredImageNet(config, str(root), str(tmp_path / "c"))
    npz = tmp_path / "npz"
    tiered_release(npz, "npz")
    data = (npz / "test_images.npz").read_bytes()
    (npz / "test_images.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(MetacliError, match=r"test_images.npz"):
        TieredImageNet(config, str(npz), str(tmp_path / "c"))
    tiered_release(npz, "npz")
    with open(npz / "val_labels.pkl", "wb") as handle:
        pickle.dump({"labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(
        MetacliError, match=r"val_labels.pkl labels 2 images, but its images file holds 15"
    ):
        TieredImageNet(config, str(npz), str(tmp_path / "c"))
    with pytest.raises(MetacliError, match="No tieredImageNet found"):
        TieredImageNet(config, str(tmp_path / "none"), str(tmp_path / "c"))


# --- CUB ------------------------------------------------------------------------------------


def test_cub_split_is_closer_look_filelist(tmp_path: Path) -> None:
    cub_release(tmp_path / "data", classes=16)
    task = CUB(CUBConfig(**EPISODE), str(tmp_path / "data"), str(tmp_path / "c"))  # type: ignore[arg-type]
    folders = [f"{c + 1:03d}.Bird_{c}" for c in range(16)]
    # write_CUB_filelist.py: sorted folders; i % 2 == 0 base, i % 4 == 1 val, i % 4 == 3 novel
    assert task.splits["train"].names == folders[0::2]
    assert task.splits["val"].names == folders[1::4]
    assert task.splits["test"].names == folders[3::4]
    assert closer_look_split([f"{i:03d}" for i in range(200)])["test"][:3] == ["003", "007", "011"]
    assert task.images.shape == (96, 3, 84, 84)
    boxed = CUB(CUBConfig(**EPISODE, boxes=True), str(tmp_path / "data"), str(tmp_path / "c"))  # type: ignore[arg-type]
    assert not torch.equal(boxed.images, task.images)


def test_cub_damaged_parts_are_named(tmp_path: Path) -> None:
    folder = cub_release(tmp_path / "data", classes=8)
    config = CUBConfig(**EPISODE)  # type: ignore[arg-type]
    first = next((folder / "images" / "001.Bird_0").iterdir())
    first.write_bytes(b"not a jpeg")
    with pytest.raises(MetacliError, match=rf"Cannot read the image .*{first.name}"):
        CUB(config, str(tmp_path / "data"), str(tmp_path / "c"))
    first.unlink()
    with pytest.raises(MetacliError, match=rf"images.txt names 001.Bird_0/{first.name}"):
        CUB(config, str(tmp_path / "data"), str(tmp_path / "c"))
    (folder / "bounding_boxes.txt").write_text("1 2 3\n")
    with pytest.raises(MetacliError, match=r"bounding_boxes.txt, line 1, has 3 fields"):
        CUB(CUBConfig(**EPISODE, boxes=True), str(folder), str(tmp_path / "c"))  # type: ignore[arg-type]


# --- data check / prepare, training, cross-domain -------------------------------------------


def test_data_check_prepare_and_a_cross_domain_run(tmp_path: Path) -> None:
    cifar = tmp_path / "cifar"
    cifar100_release(cifar)
    cub = tmp_path / "cub"
    cub_release(cub, classes=16)
    env = {"METACLI_CACHE": str(tmp_path / "cache")}
    small = ("task.ways=3", "task.queries=2", "task.test_queries=2")
    checked = run_cli(
        "data", "check", "task=fc100", f"data.root={cifar}", *small, cwd=tmp_path, env=env
    )
    assert "layout python release" in checked.stdout and "600 images decoded" in checked.stdout
    from metacli.data_command import prepare

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert prepare(["task=cub", f"data.root={cub}", cache, *small]) == 0  # (in this process)
    assert len(list((tmp_path / "cache").glob("cub-*.pt"))) == 1
    run_dir = tmp_path / "run"
    run_cli(
        "train",
        *("algo=protonet", "model=conv4", "task=cifarfs", f"data.root={cifar}"),
        *("task.ways=3", "task.shots=1", "task.queries=2", "task.augment=standard"),
        *("train.iterations=4", "train.meta_batch_size=2", "train.val_every=2"),
        *("val.num_tasks=4", "test.num_tasks=6", "test.task=cub", f"test.data_root={cub}"),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=env,
    )
    summary = read_summary(run_dir)
    assert summary["tasks"] == {"train": "cifarfs", "val": "cifarfs", "test": "cub"}
    assert summary["test"]["num_tasks"] == 6
    assert (run_dir / "checkpoints" / "best.pt").exists()


def test_cross_domain_tasks_take_the_training_episodes_and_input_size(tmp_path: Path) -> None:
    cifar = tmp_path / "cifar"
    cifar100_release(cifar)
    cub = tmp_path / "cub"
    cub_release(cub, classes=16)
    common = (
        *("algo=protonet", "model=conv4", "task=cifarfs", f"data.root={cifar}", "device=cpu"),
        *("task.ways=3", "task.shots=1", "task.queries=2", "task.test_queries=3"),
        f"data.cache_dir={tmp_path / 'c'}",
    )
    components = build(compose_config(*common, "val.task=cub", f"val.data_root={cub}"))
    val = components.task_for("val")
    assert isinstance(val, CUB) and val.cfg.image_size == 32 and val.cfg.ways == 3
    assert components.task_for("test") is components.task
    tasks = val.sample(2, "val", torch.Generator().manual_seed(0))
    assert tasks.query_x.shape == (2, 9, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"test.task=cub gives inputs of shape \(3, 64, 64\)"):
        build(compose_config(*common, "test.task=cub", "+test.task_settings.image_size=64"))
    with pytest.raises(
        ConfigError, match=r"test.task_settings.colour is not a setting of task=cub"
    ):
        build(compose_config(*common, "test.task=cub", "+test.task_settings.colour=1"))
    # its files are test.data_root's; data.root here is CIFAR's
    with pytest.raises(
        MetacliError, match=r"test\.task=cub: No CUB-200-2011 found in test\.data_root="
    ):
        build(compose_config(*common, "test.task=cub"))


# --- augmentation ----------------------------------------------------------------------------


def test_augmentation_moves_and_mirrors_a_fixed_image() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 10, 12] = 1.0
    draws = torch.full((1, DRAWS), 0.75)  # offset (0.75 * 9) = 6 in both axes; no flip
    moved = augment(image, "crop_flip", draws)
    # padded by 4, cropped at 6: the pixel moves by 4 - 6 = -2 in each axis
    assert moved[0, 0].nonzero().tolist() == [[8, 10]]
    draws[:, 2] = 0.25  # flip
    flipped = augment(image, "crop_flip", draws)
    assert flipped[0, 0].nonzero().tolist() == [[8, 31 - 10]]
    colour = torch.rand(4, 3, 84, 84)
    jittered = augment(colour, "standard", torch.rand(4, DRAWS))
    assert jittered.shape == colour.shape and jittered.min() >= 0 and jittered.max() <= 1
    resized = augment(colour, "resized_crop", torch.rand(4, DRAWS))
    assert resized.shape == colour.shape and not torch.equal(resized, colour)
    whole = torch.tensor([[0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5]])  # 100% of it
    kept = augment(colour[:1], "resized_crop", whole.expand(1, DRAWS).clone(), jitter=0.0)
    assert torch.allclose(kept, colour[:1], atol=1e-5)


def test_augmented_batches_repeat_for_a_seed_and_follow_each_task(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    cifar100_release(root)
    task = cifarfs(root, tmp_path / "c", augment="standard")
    batch = task.sample(4, "train", torch.Generator().manual_seed(0))
    keys = task_keys(0, "augment", 7, 0, 4)
    first = task.augment_batch(batch, keys)
    again = task.augment_batch(batch, keys)
    assert torch.equal(first.support_x, again.support_x) and torch.equal(
        first.query_x, again.query_x
    )
    assert not torch.equal(first.query_x, batch.query_x)
    assert torch.equal(first.query_y, batch.query_y)
    # task 1's augmentation is its own: the same in a batch of two
    pair = task.augment_batch(batch[0:2], keys[0:2])
    assert torch.equal(pair.query_x[1], first.query_x[1])
    other = task.augment_batch(batch, task_keys(1, "augment", 7, 0, 4))
    assert not torch.equal(other.query_x, first.query_x)


def test_runs_with_augmentation_repeat_exactly(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    cifar100_release(root)
    args = (
        *("algo=protonet", "model=conv4", "task=cifarfs", f"data.root={root}", "device=cpu"),
        *("task.ways=3", "task.shots=1", "task.queries=2", "task.augment=resized_crop"),
        f"data.cache_dir={tmp_path / 'c'}",
    )
    from metacli.loop import sample

    one, two = build(compose_config(*args)), build(compose_config(*args))
    a, b = sample(one), sample(two)
    assert torch.equal(a.support_x, b.support_x)
    plain = build(compose_config(*args[:-2], "task.augment=none", args[-1]))
    assert not torch.equal(sample(plain).support_x, a.support_x)
    with pytest.raises(ConfigError, match=r"task\.augment=standard, but task=synthetic"):
        build(compose_config("task=synthetic", "task.augment=standard", "device=cpu"))


def test_parallel_decoding_matches_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from PIL import Image

    import metacli.tasks.images as images

    sources: list[tuple[bytes | Path, str]] = []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(class_images(i, 1, 20, 0)[0]).save(buffer, format="PNG")
        sources.append((buffer.getvalue(), f"image {i}"))
    serial = decode_many(sources, 16, 3, "decoding", workers=1)
    monkeypatch.setattr(images, "PARALLEL_FROM", 0)
    assert torch.equal(decode_many(sources, 16, 3, "decoding", workers=2), serial)
    sources[5] = (b"broken", "image 5")
    with pytest.raises(MetacliError, match="Cannot read the image image 5"):
        decode_many(sources, 16, 3, "decoding", workers=2)
