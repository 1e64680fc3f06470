"""Figures for run reports (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from compressor.utils.fs import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def plot_layer_errors(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str,
                      keys: Sequence[str] = ("error",)) -> Path:
    """Relative reconstruction error per block, one line per layer type (and per key)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in keys:
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in layers:
            if row.get(key) is not None:
                series[row["type"]].append((row["block"], row[key]))
        for layer_type, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            style = "-" if key == keys[0] else "--"
            ax.plot(xs, ys, style, marker=".", label=f"{layer_type}" + ("" if len(keys) == 1 else f" ({key})"))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_lines(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str,
               xlabel: str, ylabel: str, logy: bool = False) -> Path:
    """A generic multi-line plot, e.g. perplexity against training tokens."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
