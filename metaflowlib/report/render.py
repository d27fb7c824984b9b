"""How the report pages render: markdown table rows, the memory column's measure, PNG figures written atomically."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from metaflowlib.io import atomic_path


def table_row(cells: Iterable[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def measured(cells: Sequence[str], kinds: Sequence[str]) -> tuple[str, list[str]]:
    """A peak-memory column: the measure its header names (a metaflowlib.memory kind) and its cells.

    Numbers of different kinds do not compare; where the rows were measured differently (stages
    run on different devices), the header says so and each cell names its own kind.
    """
    if len(set(kinds)) == 1:
        return kinds[0], list(cells)
    return "kind per cell", [f"{cell} ({kind})" for cell, kind in zip(cells, kinds)]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure: Any, path: str | Path, dpi: int, tight: bool = False) -> None:
    """Write the PNG atomically (a failed stage leaves no partial figure) and free the figure."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(figure)
