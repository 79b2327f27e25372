"""tests/textdata.py keeps fixtures as text: its round trip must be exact."""

from __future__ import annotations

import math
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests import textdata

ROOT = Path(__file__).parent.parent


def test_round_trip_is_exact_in_values_types_and_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = OrderedDict(
        [("b", torch.randn(3, generator=gen)), ("a", torch.randn(2, 2, generator=gen).double())]
    )
    weights["b"][1] = math.nan
    original = {
        "algorithm": weights,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "rng": {"python": (3, (1, 2**32 - 1), None), "torch": torch.arange(250, dtype=torch.uint8)},
        "flags": [True, None, "x", torch.tensor([True, False]), torch.tensor(7)],
        "half": torch.tensor([0.1, 65504.0], dtype=torch.bfloat16),
    }
    textdata.write(tmp_path / "x.json", original)
    back = textdata.read(tmp_path / "x.json")
    assert type(back["algorithm"]) is OrderedDict and list(back["algorithm"]) == ["b", "a"]
    for key, value in weights.items():
        assert back["algorithm"][key].dtype == value.dtype
        assert torch.equal(back["algorithm"][key].nan_to_num(9.0), value.nan_to_num(9.0))
    assert list(back["optimizer"]["state"]) == [0]  # an int key stays an int
    assert back["rng"]["python"] == (3, (1, 2**32 - 1), None)
    assert torch.equal(back["rng"]["torch"], original["rng"]["torch"])
    assert back["rng"]["torch"].dtype == torch.uint8
    assert back["flags"][:3] == [True, None, "x"] and back["flags"][3].dtype == torch.bool
    assert torch.equal(back["half"], original["half"]) and back["half"].dtype == torch.bfloat16
    # A materialized checkpoint loads as torch wrote it.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    textdata.write(run / "checkpoints" / "last.pt.json", {"w": weights["a"]})
    copy = textdata.materialize(run, tmp_path / "copy")
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["last.pt"]
    loaded = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(loaded["w"], weights["a"])


def test_the_repository_tracks_no_tensor_files() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to check")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [f for f in files if f.endswith((".pt", ".pth", ".npy", ".npz", ".pkl"))] == []
