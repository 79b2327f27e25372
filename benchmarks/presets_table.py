"""The table of every paper-row preset in docs/RESULTS.md, from the presets themselves.

    python benchmarks/presets_table.py > /tmp/rows.md

One row per ``experiment=<algo>_<task>_<ways>w<shots>s`` (and the sinusoid presets): its
setting, the training budget it sets, the published number and source from its
``published:`` block, and what ran here (``RUNS`` below: the rows of the runs table).
"""

from __future__ import annotations

import re

from metacli.config import config_dir
from metacli.precheck import compose

ROW = re.compile(r"[a-z0-9_]+?_(omniglot|miniimagenet)_\d+w\d+s(_transductive)?|[a-z]+_sinusoid")
# What ran here, by preset (docs/RESULTS.md, "Runs"); every other preset has not run.
RUNS = {
    "maml_sinusoid": "full budget: 0.36 ± 0.04 after 10 steps",
    "pretrain_sinusoid": "full budget: 2.06 ± 0.19 after 10 steps",
    "metasgd_sinusoid": "full budget: 0.48 ± 0.05 (MAML: 0.57 ± 0.06)",
    "reptile_sinusoid": "full budget: 0.53 ± 0.06 after 32 steps",
    "maml_omniglot_5w1s": "3,000 iterations (5 %): 96.2 ± 0.7 %",
    "fomaml_omniglot_5w1s": "3,000 iterations (5 %): 82.2 ± 1.6 %",
    "protonet_omniglot_5w1s": "600 episodes (3 %): 96.8 ± 0.3 %",
    "reptile_omniglot_5w1s_transductive": "2,000 iterations (2 %): 85.8 ± 1.3 %",
    "reptile_omniglot_5w1s": "the transductive run's weights (2 %): 80.6 ± 1.3 %",
    "metacurvature_omniglot_5w1s": "500 iterations (0.8 %): 93.7 ± 1.0 %",
    "imaml_omniglot_5w1s": "500 iterations of meta-batch 8 (0.6 %): 72.3 ± 1.7 %",
    "cavia_sinusoid": "full budget, seeds 0-2: 0.199 / 0.204 / 0.185 after 1 step",
}


def decimals(x: float) -> int:
    text = f"{round(x, 6):f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def number(value: float | None, ci95: float | None, accuracy: bool) -> str:
    """As printed in the paper: as many decimals as the number or its interval has."""
    if value is None:
        return "not written"
    scale, unit = (100, " %") if accuracy else (1, "")
    places = max(decimals(value * scale), decimals(ci95 * scale) if ci95 is not None else 0)
    text = f"{value * scale:.{places}f}"
    return text + (f" ± {ci95 * scale:.{places}f}" if ci95 is not None else "") + unit


def main() -> None:
    print("| preset | budget | published | source | run here |")
    print("|---|---|---|---|---|")
    for path in sorted((config_dir() / "experiment").glob("*.yaml")):
        if not ROW.fullmatch(path.stem):
            continue
        cfg = compose("train", [f"experiment={path.stem}"])
        budget = f"{cfg.train.iterations:,} x {cfg.train.meta_batch_size}"
        if cfg.algo.name in ("baseline", "baselinepp", "rfs"):  # mini-batches of images
            budget = f"{cfg.train.iterations:,} x {cfg.algo.batch_size} images"
        accuracy = cfg.task.name != "sinusoid"
        published = number(cfg.published.value, cfg.published.ci95, accuracy)
        source = cfg.published.source or "-"
        ran = RUNS.get(path.stem, "not run")
        print(f"| `{path.stem}` | {budget} | {published} | {source} | {ran} |")


if __name__ == "__main__":
    main()
