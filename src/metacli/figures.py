"""matplotlib, loaded on demand (the ``plot`` extra), and the drawings that need no run
folder: an architecture search's cells (``genotype.png``, written by ``algo=metanas``).

Components low in the package may draw with this module; ``metacli.plots`` builds the
figures of run folders on it.
"""

from __future__ import annotations

import io
from typing import Any

from metacli.errors import MetacliError
from metacli.extras import require_extra


def pyplot() -> Any:
    require_extra("plot", "plotting")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def genotype_figure(genotype: dict[str, Any]) -> bytes | None:
    """One drawing per cell type: inputs, nodes, each kept edge labelled with its operation
    (None without matplotlib, the ``plot`` extra)."""
    try:
        plt = pyplot()
    except MetacliError:
        return None

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, kind in zip(axes, ("normal", "reduce"), strict=True):
        nodes = len(genotype[kind])
        where = {0: (0.0, 1.0), 1: (0.0, -1.0), nodes + 2: (nodes + 1.2, 0.0)}
        for i in range(nodes):  # nodes on a zigzag, so that no edge runs through a node
            where[i + 2] = (1.2 + i, 0.55 * (-1) ** i)
        names = {0: "c_{k-2}", 1: "c_{k-1}", nodes + 2: "c_{k}"}
        for i, node in enumerate(genotype[kind]):
            for op, j in node:
                (x0, y0), (x1, y1) = where[int(j)], where[i + 2]
                bend = 0.25 if (i + int(j)) % 2 else -0.25
                arrow = {"arrowstyle": "-|>", "shrinkA": 14, "shrinkB": 14, "lw": 1.1}
                arrow["connectionstyle"] = f"arc3,rad={bend}"
                ax.annotate("", (x1, y1), (x0, y0), arrowprops=arrow)
                # the label near the middle of the bent edge, pushed off it
                mx, my = (x0 + x1) / 2, (y0 + y1) / 2
                dx, dy = x1 - x0, y1 - y0
                mx, my = mx + bend * dy * 0.5, my - bend * dx * 0.5
                ax.text(mx, my, str(op), fontsize=8, ha="center", va="center", color="darkred")
            arrow = {"arrowstyle": "-|>", "shrinkA": 14, "shrinkB": 14, "ls": ":"}
            ax.annotate("", where[nodes + 2], where[i + 2], arrowprops=arrow)
        for index, (x, y) in where.items():
            label = names.get(index, str(index - 2))
            colour = "lightyellow" if index > 1 else "lightblue"
            text = f"${label}$" if "_" in label else label
            box = {"boxstyle": "round", "fc": colour}
            ax.text(x, y, text, ha="center", va="center", bbox=box)
        ax.set_title(f"{kind} cell")
        ax.set_xlim(-0.5, nodes + 1.7)
        ax.set_ylim(-1.5, 1.5)
        ax.axis("off")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
