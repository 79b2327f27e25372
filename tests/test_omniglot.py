"""Omniglot from local files: every layout, every split, rotations, errors, real data."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metacli.errors import ConfigError, MetacliError
from metacli.tasks.omniglot import Omniglot, OmniglotConfig, character_of
from tests.conftest import OMNIGLOT, read_metrics, run_cli

REAL = OMNIGLOT
ALPHABETS = {"images_background": ["Alpha", "Beta"], "images_evaluation": ["Gamma"]}
CHARACTERS, DRAWERS = 3, 4


def glyph(seed: int) -> bytes:
    """A 105x105 one-bit PNG like the official files: white background, black strokes."""
    gen = torch.Generator().manual_seed(seed)
    image = Image.new("1", (105, 105), 1)
    x0, y0 = (int(v) for v in torch.randint(5, 60, (2,), generator=gen))
    for x in range(x0, x0 + 40):
        for y in range(y0, y0 + 6):
            image.putpixel((x, y), 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def files() -> dict[str, bytes]:
    out, seed = {}, 0
    for image_set, alphabets in ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(1, CHARACTERS + 1):
                seed += 1
                for d in range(1, DRAWERS + 1):
                    out[f"{image_set}/{alphabet}/character{c:02d}/{seed:04d}_{d:02d}.png"] = glyph(
                        seed * 100 + d
                    )
    return out


def make(root: Path, layout: str) -> Path:
    root.mkdir(parents=True)
    if layout == "zip":
        for image_set in ALPHABETS:
            with zipfile.ZipFile(root / f"{image_set}.zip", "w") as archive:
                for name, data in files().items():
                    if name.startswith(image_set):
                        archive.writestr(name, data)
    else:
        base = root / "omniglot-py" if layout == "torchvision" else root
        for name, data in files().items():
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_bytes(data)
    return root


def config(**kwargs: object) -> OmniglotConfig:
    defaults: dict[str, object] = {
        "ways": 2,
        "shots": 1,
        "queries": 2,
        "split": "random",
        "random_sizes": [4, 2],
    }
    return OmniglotConfig(**{**defaults, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["zip", "folders", "torchvision"])
def test_every_layout_reads_the_same_images(tmp_path: Path, layout: str) -> None:
    task = Omniglot(config(), str(make(tmp_path / layout, layout)), str(tmp_path / "cache"))
    assert task.layout == layout
    assert len(task.characters) == 9 and [len(i) for i in task.class_images] == [DRAWERS] * 9
    assert task.images.shape == (36, 1, 28, 28) and task.images.dtype == torch.uint8
    assert task.images.max() == 255 and task.images.min() == 0
    assert task.images.float().mean() < 60  # mostly background: ink is the bright value
    reference = Omniglot(config(), str(make(tmp_path / "ref", "zip")), str(tmp_path / "c2"))
    assert torch.equal(task.images, reference.images)


def test_cache_is_reused_and_keyed_by_preprocessing(tmp_path: Path) -> None:
    root, cache = make(tmp_path / "data", "zip"), tmp_path / "cache"
    Omniglot(config(), str(root), str(cache))
    Omniglot(config(), str(root), str(cache))
    assert len(list(cache.glob("omniglot-*.pt"))) == 1
    Omniglot(config(image_size=20), str(root), str(cache))
    assert len(list(cache.glob("omniglot-*.pt"))) == 2
    assert not list(cache.glob("*.tmp"))


def test_nearest_resize_gives_the_binary_images_of_mamls_preprocessing(tmp_path: Path) -> None:
    """cbfinn/maml's resize_images.py: Image.open(png).resize((28, 28), LANCZOS) on the
    1-bit files, which PIL resizes with NEAREST: binary images."""
    root, cache = make(tmp_path / "data", "zip"), tmp_path / "cache"
    binary = Omniglot(config(resize="nearest"), str(root), str(cache))
    grey = Omniglot(config(), str(root), str(cache))
    assert len(list(cache.glob("omniglot-*.pt"))) == 2  # keyed by the resampling
    assert set(binary.images.unique().tolist()) == {0, 255}
    assert len(grey.images.unique()) > 2  # antialiased
    with zipfile.ZipFile(root / "images_background.zip") as archive:
        first = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        reference = Image.open(io.BytesIO(archive.read(first)))
    assert reference.mode == "1"
    resized = reference.resize((28, 28), resample=Image.Resampling.LANCZOS)  # as MAML's
    pixels = bytearray(resized.convert("L").tobytes())
    ink = 255 - torch.frombuffer(pixels, dtype=torch.uint8)
    index = binary.characters.index(character_of(first))
    assert torch.equal(binary.images[binary.class_images[index][0]].flatten(), ink)
    with pytest.raises(ConfigError, match=r"task\.resize"):
        config(resize="bilinear")


def test_random_and_lake_splits_with_rotations(tmp_path: Path) -> None:
    root, cache = str(make(tmp_path / "d", "zip")), str(tmp_path / "c")
    task = Omniglot(config(), root, cache)
    sizes = {s: len(c) for s, c in task.splits.items()}
    assert sizes == {"train": 4 * 4, "val": 2, "test": 3}  # train characters x 4 rotations
    rows = {s: set(c.indices[:, 0].tolist()) for s, c in task.splits.items()}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"])
    assert sorted(task.splits["train"].turns.tolist()) == sorted([0, 1, 2, 3] * 4)
    lake = Omniglot(config(split="lake", lake_val=2, test_rotations=[0, 180]), root, cache)
    test_sets = {
        lake.character_set[lake.characters.index(c)]
        for c in lake.characters
        if lake.class_images[lake.characters.index(c)][0]
        in set(lake.splits["test"].indices[:, 0].tolist())
    }
    assert test_sets == {"images_evaluation"} and len(lake.splits["test"]) == 3 * 2
    assert len(lake.splits["val"]) == 2 * 2 and len(lake.splits["train"]) == 4 * 4


def test_vinyals_split_files_and_their_errors(tmp_path: Path) -> None:
    root = make(tmp_path / "d", "folders")
    cache = str(tmp_path / "c")
    with pytest.raises(MetacliError, match="looked in"):
        Omniglot(config(split="vinyals"), str(root), cache)
    splits = root / "splits" / "vinyals"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("Alpha/character01/rot000\nAlpha/character02/rot090\n")
    (splits / "val.txt").write_text("Beta/character01/rot000\nBeta/character02/rot000\n")
    (splits / "test.txt").write_text("Gamma/character01/rot000\nGamma/character03/rot270\n")
    task = Omniglot(config(split="vinyals"), str(root), cache)
    assert {s: len(c) for s, c in task.splits.items()} == {"train": 2, "val": 2, "test": 2}
    assert task.splits["test"].turns.tolist() == [0, 3]
    trainval = Omniglot(config(split="vinyals_trainval"), str(root), cache)  # ProtoNets'
    assert trainval.splits["train"].names == task.splits["train"].names + task.splits["val"].names
    assert trainval.splits["val"].names == task.splits["val"].names
    (splits / "val.txt").write_text("Beta/character09/rot000\n")
    with pytest.raises(MetacliError, match="Beta/character09"):
        Omniglot(config(split="vinyals"), str(root), cache)


def test_episodes_are_seeded_and_rotations_rotate(tmp_path: Path) -> None:
    task = Omniglot(
        config(shots=1, queries=3), str(make(tmp_path / "d", "zip")), str(tmp_path / "c")
    )
    a = task.sample(3, "train", torch.Generator().manual_seed(5))
    b = task.sample(3, "train", torch.Generator().manual_seed(5))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.support_x.shape == (3, 2, 1, 28, 28) and a.query_x.shape == (3, 6, 1, 28, 28)
    assert a.support_y.tolist()[0] == [0, 1] and a.query_y.tolist()[0] == [0, 0, 0, 1, 1, 1]
    assert a.support_x.min() >= 0 and a.support_x.max() <= 1
    # A rotated class holds its base character's images turned by its quarter turns.
    train = task.splits["train"]
    row = int((train.turns == 1).nonzero()[0])
    task.splits["train"] = type(train)(
        train.indices[row : row + 1].repeat(2, 1),
        train.turns[row : row + 1].repeat(2),
        train.counts[row : row + 1].repeat(2),
        [train.names[row]] * 2,
    )
    episode = task.sample(1, "train", torch.Generator().manual_seed(0))
    base = task.images[train.indices[row]].float() / 255
    rotated = torch.rot90(base, 1, dims=(-2, -1))
    assert any(torch.equal(episode.support_x[0, 0], r) for r in rotated)


def test_bad_data_gets_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MetacliError, match=r"images_background\.zip"):
        Omniglot(config(), str(tmp_path / "nothing"), str(tmp_path / "c"))
    with pytest.raises(MetacliError, match=r"data\.root"):
        Omniglot(config(), None, str(tmp_path / "c"))
    root = make(tmp_path / "bad", "folders")
    broken = next(root.glob("images_background/Alpha/character01/*.png"))
    broken.write_bytes(b"not a png")
    with pytest.raises(MetacliError, match="Alpha/character01"):
        Omniglot(config(), str(root), str(tmp_path / "c"))
    with pytest.raises(MetacliError, match=r"task\.ways"):
        Omniglot(config(ways=20), str(make(tmp_path / "ok", "zip")), str(tmp_path / "c"))


@pytest.fixture(scope="module")
def real() -> Omniglot:
    if not (REAL / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found at {REAL} (see its README)")
    return Omniglot(OmniglotConfig(), str(REAL))  # the session's METACLI_CACHE


def test_real_omniglot_counts_and_vinyals_split(real: Omniglot) -> None:
    background = real.character_set.count("images_background")
    evaluation = real.character_set.count("images_evaluation")
    assert (background, evaluation) == (964, 659)
    assert [len(i) for i in real.class_images] == [20] * 1623
    assert {s: len(c) for s, c in real.splits.items()} == {"train": 4112, "val": 688, "test": 1692}
    episode = real.sample(2, "test", torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (2, 5, 1, 28, 28)
    assert episode.query_x.shape == (2, 75, 1, 28, 28)


def fixture_args(root: Path) -> tuple[str, ...]:
    """The overrides that make `metacli data` use a fixture as `config()` does."""
    return (
        "task=omniglot",
        f"data.root={root}",
        "task.split=random",
        "task.random_sizes=[4,2]",
        "task.ways=2",
        "task.queries=2",
    )


@pytest.mark.slow  # end to end, several CLI runs: make test-full
def test_data_check_and_prepare_commands(tmp_path: Path) -> None:
    root = make(tmp_path / "d", "zip")
    args = fixture_args(root)
    prepared = run_cli("data", "prepare", *args, cwd=tmp_path)
    assert "36 images ready" in prepared.stdout
    checked = run_cli("data", "check", *args, cwd=tmp_path)
    assert "layout zip" in checked.stdout and "No problems found" in checked.stdout
    assert "6 images_background, 3 images_evaluation" in checked.stdout
    too_many = run_cli("data", "check", *args, "task.queries=10", cwd=tmp_path, check=False)
    assert too_many.returncode == 1 and "shots + queries" in too_many.stdout
    missing = run_cli(
        "data", "check", "task=omniglot", f"data.root={tmp_path / 'x'}", cwd=tmp_path, check=False
    )
    assert missing.returncode == 1 and "images_background.zip" in missing.stdout
    assert not (tmp_path / "outputs").exists()


def test_data_check_on_real_omniglot(tmp_path: Path, real: Omniglot) -> None:
    result = run_cli("data", "check", "task=omniglot", f"data.root={REAL}", cwd=tmp_path)
    assert "964 images_background, 659 images_evaluation" in result.stdout
    for count in ("4112", "688", "1692"):
        assert count in result.stdout
    assert "No problems found" in result.stdout


@pytest.mark.slow
def test_maml_on_real_omniglot_rises_above_chance(tmp_path: Path, real: Omniglot) -> None:
    """`metacli train algo=maml task=omniglot model=conv4 data.root=...`, a few hundred its."""
    run_cli(
        "train",
        "algo=maml",
        "task=omniglot",
        "model=conv4",
        f"data.root={REAL}",
        "train.iterations=200",
        "train.meta_batch_size=4",
        "train.val_every=100",
        "algo.inner_lr=0.4",
        "algo.test_inner_steps=3",
        "val.num_tasks=50",
        "test.num_tasks=100",
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=1200,
    )
    vals = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert vals[-1]["metric"] > 0.5  # chance is 0.2 for 5 ways
    assert vals[-1]["metric"] > vals[-1]["metric_before"] + 0.2


BATCH = {"metalstm": 1, "alfa": 2, "space": 4}  # meta-batch sizes of the short runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment",
    ["metalstm_omniglot_1shot", "alfa_omniglot_1shot", "space_omniglot_1shot"],
    ids=["metalstm", "alfa", "space"],
)
def test_learned_optimizers_on_real_omniglot_learn_to_adapt(
    tmp_path: Path, real: Omniglot, experiment: str
) -> None:
    """The README's short runs of the learned-optimizer presets, shortened again."""
    run_cli(
        "train",
        f"experiment={experiment}",
        f"data.root={REAL}",
        "train.iterations=100",
        f"train.meta_batch_size={BATCH[experiment.split('_')[0]]}",
        "train.val_every=100",
        "val.num_tasks=50",
        "test.num_tasks=50",
        "hydra.run.dir=run",
        cwd=tmp_path,
        timeout=1800,
    )
    vals = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert vals[-1]["metric_before"] < 0.3  # an untrained head: chance, 0.2
    assert vals[-1]["metric"] > vals[-1]["metric_before"] + 0.3
    if experiment.startswith("space"):  # which optimizer each task drew, as fractions
        train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"][-1]
        chosen = [train[f"space_chose_{m}"] for m in ("sgd", "momentum", "adam")]
        assert sum(chosen) == pytest.approx(1.0) and 0 < train["space_p_adam"] < 1


def test_data_check_lists_a_character_with_missing_drawers(tmp_path: Path) -> None:
    root = make(tmp_path / "d", "folders")
    next(root.glob("images_evaluation/Gamma/character02/*_04.png")).unlink()
    task = Omniglot(config(), str(root), str(tmp_path / "c"))
    assert task.problems == [
        "Gamma/character02 has 3 images, not 4 like most classes (it uses its 3)"
    ]
    # that class keeps its 3 images, every other class all 4 of its own
    assert sorted(len(i) for i in task.class_images) == [3] + [4] * 8
    counts = {
        n: int(k) for c in task.splits.values() for n, k in zip(c.names, c.counts, strict=True)
    }
    assert counts["Gamma/character02/rot000"] == 3
    assert {k for n, k in counts.items() if not n.startswith("Gamma/character02")} == {4}
    result = run_cli("data", "check", *fixture_args(root), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Gamma/character02 has 3 images" in result.stdout


@pytest.mark.slow
def test_plot_works_for_an_omniglot_run_and_titles_say_what_ran(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    root = make(tmp_path / "d", "zip")
    small = ("model=conv4", "model.filters=4", "train.iterations=4", "train.val_every=2")
    sizes = ("train.meta_batch_size=2", "val.num_tasks=4", "test.num_tasks=4", "seed=3")
    cache = f"data.cache_dir={tmp_path / 'c'}"
    run_cli("train", *fixture_args(root), cache, *small, *sizes, "hydra.run.dir=run", cwd=tmp_path)
    result = run_cli("plot", "run", cwd=tmp_path)
    written = {Path(line.removeprefix("wrote ")).name for line in result.stdout.splitlines()}
    assert written == {"learning_curves.png", "inner_steps.png"}  # no regression figure
    for name in written:
        title = Image.open(tmp_path / "run" / name).text["Title"]
        assert title == "maml on omniglot (conv4), seed 3"


@pytest.mark.slow
def test_architecture_search_on_real_omniglot_learns_and_its_genotype_trains(
    tmp_path: Path, real: Omniglot
) -> None:
    """The README's search (experiment=metanas_cpu), shortened; then the found network
    from scratch with MAML (model=genotype), as the README says to."""
    run_cli(
        "train",
        "experiment=metanas_cpu",
        f"data.root={REAL}",
        "train.iterations=40",
        "train.val_every=40",
        "val.num_tasks=40",
        "test.num_tasks=40",
        "hydra.run.dir=search",
        cwd=tmp_path,
        timeout=1800,
    )
    vals = [r for r in read_metrics(tmp_path / "search") if r["split"] == "val"]
    assert vals[-1]["metric"] > vals[-1]["metric_before"] + 0.2
    genotype = json.loads((tmp_path / "search" / "genotype.json").read_text())
    assert len(genotype["normal"]) == 2 and (tmp_path / "search" / "genotype.png").is_file()
    run_cli(
        "train",
        "algo=fomaml",
        "task=omniglot",
        f"data.root={REAL}",
        "model=genotype",
        f"model.genotype={tmp_path / 'search'}",
        "algo.inner_lr=0.4",
        "algo.inner_steps=3",
        "task.queries=5",
        "train.iterations=20",
        "train.meta_batch_size=4",
        "train.val_every=20",
        "val.num_tasks=20",
        "test.num_tasks=20",
        "hydra.run.dir=derived",
        cwd=tmp_path,
        timeout=1800,
    )
    summary = json.loads((tmp_path / "derived" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test"]["mean"] > 0.3
