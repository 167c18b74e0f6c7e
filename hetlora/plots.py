"""PNG plots. matplotlib is optional on devices (`plots` extra): without it, say so and go on."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("hetlora.plots")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        log.warning("matplotlib is not installed: no PNG written (pip install 'hetlora-edge[plots]')")
        return None
    return plt


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, panels: list[tuple[str, int]], xlabel: str,
              title: str) -> Path | None:
    """One panel per (ylabel, column); `series[name] = (x values, [column values, ...])`."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, column) in zip(axes[0], panels):
        for name, (xs, columns) in series.items():
            ax.plot(xs, columns[column], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
