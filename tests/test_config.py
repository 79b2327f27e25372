"""Every option of every group composes and builds; bad values are rejected by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from metacli.build import build, check, resolve_device
from metacli.config import DeviceConfig
from metacli.errors import ConfigError
from tests.conftest import CONF, OMNIGLOT, compose_config, options

IMAGE_MODELS = ("conv4", "resnet12")
# algorithms that only classify (composed on synthetic images, not the sinusoid)
CLASSIFIERS = (
    "protonet",
    "matchingnet",
    "relationnet",
    "r2d2",
    "metaoptnet",
    "baseline",
    "baselinepp",
    "rfs",
)


DATASETS = ("omniglot", "miniimagenet", "cifarfs", "fc100", "tieredimagenet")
PAPER_ROW = re.compile(
    r"(?P<algo>[a-z0-9]+)(?P<variant>_ridge|_proto)?_(?P<task>"
    + "|".join(DATASETS)
    + r")(?P<target>_cub)?_(?P<ways>\d+)w(?P<shots>\d+)s"
    r"(_transductive)?"
)


def first_rows() -> set[str]:
    """One paper-row preset per algorithm and task: the rows of one reference code share
    their protocol file, so ``make test`` builds and runs one of them and checks the
    others' every key (all are built by the slow test below). The presets of data that is
    not here all run on the same synthetic stand-in: one of them per algorithm."""
    first: dict[tuple[str, str], tuple[int, int, str]] = {}
    for option in options("experiment"):
        row = PAPER_ROW.fullmatch(option)
        if row is not None:
            size = (int(row["ways"]), int(row["shots"]), option)  # the smallest setting
            task = row["task"] if row["task"] == "omniglot" else "stand-in"
            key = (row["algo"] + (row["variant"] or ""), task + (row["target"] or ""))
            first[key] = min(first.get(key, size), size)
    return {option for _, _, option in first.values()}


BUILT_ROWS = first_rows()

# Presets of real Omniglot (skipped where it is absent), by name.
DATA_EXPERIMENTS = tuple(
    o for o in options("experiment") if "omniglot" in o and not o.startswith("metanas")
)
# presets of data that is not here: built on small synthetic colour images (every setting
# of the preset is checked and used; only the image size differs)
STANDIN = ("task=synthetic", "task.image_size=28", "task.channels=3")


def standin(option: str) -> tuple[str, ...]:
    """A preset of data that is not here on the synthetic stand-in, without the keys the
    stand-in lacks and with its own validation and test tasks (not CUB's)."""
    text = (CONF / "experiment" / f"{option}.yaml").read_text()
    dropped = [f"~task.{k}" for k in ("normalize", "train_classes", "augment") if f"  {k}:" in text]
    dropped += [
        f"~{s}.task" for s in ("val", "test") if f"\n{s}:\n" in text and "task: cub" in text
    ]
    return (*STANDIN, *dropped)


STANDIN_EXPERIMENTS = {
    **{
        o: standin(o)
        for o in options("experiment")
        if any(d in o for d in DATASETS[1:]) and not o.startswith("metanas")
    },
    # the architecture searches on small images with one query per class and one inner
    # step: their networks are built and run as set, at a size a unit test affords
    **{
        f"metanas_{name}": (
            "task=synthetic",
            "task.image_size=8",
            "task.ways=5",
            "task.shots=2",
            "task.test_shots=1",
            "task.queries=1",
            "algo.inner_steps=1",
        )
        for name in ("omniglot", "miniimagenet", "cpu")
    },
}
SMALL_SEARCH = ("model.channels=2", "model.cells=2", "model.nodes=2", "task.image_size=8")
COMPANIONS = {  # options that need others to build quickly
    ("algo", "metanas"): ("task=synthetic", "model=darts", *SMALL_SEARCH),
    ("algo", "relationnet"): ("task=synthetic", "model=conv4", "model.pool_blocks=2"),
    ("model", "darts"): ("task=synthetic", *SMALL_SEARCH),
    ("model", "genotype"): (
        "task=synthetic",
        "task.image_size=8",
        f"model.genotype={Path(__file__).parent / 'data' / 'genotype.json'}",
    ),
}
REAL_DATA = {
    "omniglot": OMNIGLOT / "images_background.zip",
    "miniimagenet": None,
    "image_folder": None,
    # tests/test_datasets.py builds these from fixtures in each release's layout
    "cifarfs": None,
    "fc100": None,
    "tieredimagenet": None,
    "cub": None,
}
IMAGE_TASK = ("task=synthetic", "task.image_size=32", "task.channels=3")


def test_every_group_has_options() -> None:
    for group in ("algo", "update", "task", "model", "device", "optim", "experiment", "debug"):
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(
    "group", ["algo", "update", "task", "model", "optim", "experiment", "debug"]
)
def test_every_option_composes_and_builds(group: str) -> None:
    compose_check_build(group, run_all=False)


@pytest.mark.slow
def test_every_paper_row_preset_builds_and_runs() -> None:
    compose_check_build("experiment", run_all=True)


def compose_check_build(group: str, run_all: bool) -> None:
    """Every option composes and passes the typed checks; each is built and runs one
    meta-loss (of the paper rows, one per algorithm and task unless ``run_all``)."""
    for option in options(group):
        companions = IMAGE_TASK if group == "model" and option in IMAGE_MODELS else ()
        if group == "algo" and option in CLASSIFIERS:
            companions = ("task=synthetic",)
        if group == "experiment" and option in DATA_EXPERIMENTS:
            if not (OMNIGLOT / "images_background.zip").is_file():
                continue
            companions = (f"data.root={OMNIGLOT}",)
        if group == "experiment" and option in STANDIN_EXPERIMENTS:
            companions = STANDIN_EXPERIMENTS[option]
        companions = COMPANIONS.get((group, option), companions)
        if group == "task" and option in REAL_DATA:
            marker = REAL_DATA[option]
            if marker is None or not marker.is_file():
                continue  # no real data here: tests/test_<task>.py covers it with fixtures
            companions = (f"data.root={marker.parent}",)
        cfg = compose_config(f"{group}={option}", "device=cpu", *companions)
        check(cfg)
        row = group == "experiment" and PAPER_ROW.fullmatch(option) is not None
        if row and not run_all and option not in BUILT_ROWS:
            continue
        components = build(cfg)
        algorithm = components.algorithm
        batch = algorithm.training_batch(components.task, 2, torch.Generator().manual_seed(0))
        out = algorithm.meta_loss(batch)
        tasks = 2 if algorithm.episodic else 1  # (one mini-batch of images)
        assert torch.isfinite(out.loss) and out.metric.shape == (tasks,), (group, option)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "mps"])
def test_every_device_option(device: str) -> None:
    cfg = compose_config(f"device={device}")
    available = {
        "auto": True,
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }[device]
    if available:
        assert build(cfg).device.type in ("cpu", "cuda", "mps")
    else:
        with pytest.raises(ConfigError, match=f"device={device}.*device=cpu"):
            build(cfg)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(DeviceConfig("auto")).type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(DeviceConfig("auto")).type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(DeviceConfig("auto")).type == "cuda"


def test_test_config_composes_like_train() -> None:
    cfg = compose_config("algo=fomaml", "ckpt_path=x.pt", name="test")
    assert cfg.algo.name == "fomaml" and cfg.ckpt_path == "x.pt"
    check(cfg)


def test_paper_preset_matches_finn_et_al() -> None:
    cfg = compose_config("experiment=maml_sinusoid")
    assert (cfg.task.shots, cfg.algo.inner_steps, cfg.algo.inner_lr) == (10, 1, 0.01)
    assert (cfg.train.meta_batch_size, cfg.optim.name, cfg.optim.lr) == (25, "adam", 0.001)
    assert cfg.train.iterations == 70000 and cfg.model.hidden == [40, 40]
    assert (cfg.model.init, cfg.model.init_std) == ("truncated_normal", 0.01)
    assert (cfg.task.test_shots, cfg.algo.test_inner_steps) == (5, 10)


def test_paper_presets_name_their_numbers_and_rows_are_what_their_names_say() -> None:
    """Both read every preset as composed: one composition each (0.2 s) serves both."""
    presets = {preset: compose_config(f"experiment={preset}") for preset in options("experiment")}
    published_numbers_and_selection(presets)
    rows_are_what_their_names_say(presets)


def published_numbers_and_selection(presets: dict[str, DictConfig]) -> None:
    named = 0
    for preset, cfg in presets.items():
        if cfg.published.value is None:
            continue
        named += 1
        assert cfg.published.source, preset  # a number always says where it is from
        assert cfg.val.num_tasks >= 500 and cfg.test.num_tasks >= 600, preset
        # the best-validation and the last weights (or the last alone, ProtoNets' train+val)
        assert cfg.test.report_last or cfg.test.checkpoint == "last", preset
        accuracy = cfg.task.name != "sinusoid"
        assert not accuracy or 0.2 < cfg.published.value <= 1.0, preset  # a fraction
    assert named >= 5


def rows_are_what_their_names_say(presets: dict[str, DictConfig]) -> None:
    """experiment=<algo>_<task>_<ways>w<shots>s: that algorithm (or update rule, for a
    method that is one: metacurvature), task and test setting (ProtoNets trains with more
    ways than it tests), its paper cited; the rows cover every algorithm."""
    rows: dict[str, set[str]] = {}
    for preset, cfg in presets.items():
        name = PAPER_ROW.fullmatch(preset)
        if name is None:
            continue
        ways = cfg.task.test_ways or cfg.task.ways
        shots = cfg.task.test_shots or cfg.task.shots
        rule = cfg.algo.get("update")
        method = rule if name["algo"] == rule else cfg.algo.name
        assert (method, cfg.task.name) == (name["algo"], name["task"]), preset
        assert (ways, shots) == (int(name["ways"]), int(name["shots"])), preset
        assert cfg.published.source, preset
        assert cfg.algo.name != "reptile" or cfg.algo.transductive == preset.endswith("ive")
        if name["variant"]:
            assert cfg.algo.head == name["variant"][1:], preset
        if name["target"]:  # Chen et al.'s cross-domain protocol
            assert (cfg.val.task, cfg.test.task, cfg.task.train_classes) == ("cub", "cub", "all")
            assert cfg.published.value is None and "Table 3" in cfg.published.source, preset
        elif name["task"] not in ("omniglot", "miniimagenet"):
            assert cfg.published.value is not None, preset  # a number from the paper's table
        task = name["task"] + (name["target"] or "")
        rows.setdefault(name["algo"] + (name["variant"] or ""), set()).add(task)
    both = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "protonet", "imaml")
    for algo in (*both, "metacurvature"):
        assert {"omniglot", "miniimagenet"} <= rows[algo], algo
    assert rows["boil"] == rows["cavia"] == {"miniimagenet"}
    baselines = ("matchingnet", "relationnet", "r2d2", "metaoptnet", "baseline", "baselinepp")
    for algo in (*baselines, "rfs"):
        assert "miniimagenet" in rows[algo], algo
    # the rows of Lee et al. 2019's Tables 1 and 2 for the algorithms metacli has
    assert rows["metaoptnet"] >= {"cifarfs", "fc100", "tieredimagenet"}
    assert rows["metaoptnet_ridge"] >= {"cifarfs", "fc100", "tieredimagenet"}
    assert rows["metaoptnet_proto"] == {"cifarfs", "fc100"}
    assert rows["protonet"] >= {"cifarfs", "fc100", "tieredimagenet", "miniimagenet_cub"}
    assert rows["maml"] >= {"cifarfs", "tieredimagenet", "miniimagenet_cub"}
    assert rows["relationnet"] >= {"cifarfs", "tieredimagenet"} and "cifarfs" in rows["r2d2"]
    cross = {a for a, r in rows.items() if "miniimagenet_cub" in r}
    assert cross == {"baseline", "baselinepp", "protonet", "matchingnet", "relationnet", "maml"}
    ridge = compose_config("experiment=metaoptnet_ridge_miniimagenet_5w1s")
    assert (ridge.algo.name, ridge.algo.head) == ("metaoptnet", "ridge")
    assert sum(len(r) for r in rows.values()) == 50  # (algorithm, dataset) pairs


def test_maml_reference_code_settings_in_the_omniglot_and_miniimagenet_presets() -> None:
    omniglot = compose_config("experiment=maml_omniglot_5w1s")
    assert (omniglot.task.resize, omniglot.task.queries, omniglot.task.split) == (
        "nearest",
        1,
        "random",
    )
    for cfg in (omniglot, compose_config("experiment=maml_miniimagenet_5w5s")):
        assert cfg.algo.inner_loss == "sum_over_shots" and not cfg.algo.adapt_norm
        assert not cfg.model.norm_scale and cfg.algo.test_inner_steps == 10
    first_order = compose_config("experiment=fomaml_omniglot_5w1s")
    assert first_order.algo.name == "fomaml" and first_order.task.resize == "nearest"
    assert first_order.published.value == 0.983
    mini = compose_config("experiment=maml_miniimagenet_5w1s")
    assert (mini.model.filters, mini.train.meta_batch_size, mini.train.grad_clamp) == (32, 4, 10)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("task.shots=0", "task.shots"),
        ("task.queries=-1", "task.queries"),
        ("algo.inner_lr=0", "algo.inner_lr"),
        ("algo.inner_steps=0", "algo.inner_steps"),
        ("algo.batching=fast", "algo.batching"),
        ("optim.lr=-0.1", "optim.lr"),
        ("train.meta_batch_size=0", "train.meta_batch_size"),
        ("train.val_every=0", "train.val_every"),
        ("val.num_tasks=0", "val.num_tasks"),
        ("test.checkpoint=middle", "test.checkpoint"),
        ("model.hidden=[40,0]", "model.hidden"),
        ("seed=-1", "seed"),
        ("+train.iteratons=5", "train.iteratons"),
        ("+task.way=5", "task.way"),
        ("algo.inner_lr=fast", "algo.inner_lr"),
        ("task.amplitude=[5.0,0.1]", "task.amplitude"),
        ("algo.inner_loss=median", "algo.inner_loss"),
        ("train.grad_clamp=0", "train.grad_clamp"),
        ("optim.epoch_iterations=0", "optim.epoch_iterations"),
        ("model.init_std=0", "model.init_std"),
        ("published.value=high", "published.value"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_config(override))
    assert named in str(info.value)


def test_a_bad_metasgd_start_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"algo\.metasgd_init"):
        check(compose_config("algo=metasgd", "algo.metasgd_init=[0.1,0.005]"))


def test_protonet_preset_trains_60_way_on_train_and_val_and_tests_5_way_15_queries() -> None:
    cfg = compose_config("experiment=protonet_omniglot_5w1s")
    assert (cfg.task.ways, cfg.task.test_ways, cfg.task.queries, cfg.task.test_queries) == (
        60,
        5,
        5,
        15,
    )
    assert cfg.task.split == "vinyals_trainval" and cfg.model.norm == "running"
    assert (cfg.optim.scheduler, cfg.optim.step_size, cfg.optim.gamma) == ("step", 2000, 0.5)
    assert cfg.train.meta_batch_size == 1 and cfg.test.checkpoint == "last"


def test_metasgd_preset_starts_its_rates_from_the_papers_uniform() -> None:
    cfg = compose_config("experiment=metasgd_sinusoid")
    assert cfg.algo.metasgd_init == [0.005, 0.1] and cfg.task.frequency == [0.8, 1.2]
    rates = build(compose_config("experiment=metasgd_sinusoid", "device=cpu"))
    values = torch.cat([r.detach().flatten() for r in rates.algorithm.learned_rates().values()])
    assert values.min() >= 0.005 and values.max() <= 0.1 and values.std() > 0.02
