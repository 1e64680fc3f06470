"""Figures for run reports (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

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
    _label(ax, title, xlabel, ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tradeoff(points: Mapping[str, tuple[float, float, Optional[float]]], path: str | Path, title: str,
                  xlabel: str, ylabel: str, logx: bool = True) -> Path:
    """One labelled point per series, e.g. a model's perplexity (x) against its mean task accuracy (y),
    with the y standard error as a bar where known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y, err) in points.items():
        ax.errorbar([x], [y], yerr=None if err is None else [err], fmt="o", capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log")
    _label(ax, title, xlabel, ylabel)
    return _save(fig, path)


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def score_rows(tasks: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, float, Optional[float]]]:
    """(task:metric, value, stderr) of the scores of a report's tasks (metrics where higher is better)."""
    return [(f"{task}:{name}", m["value"], m.get("stderr")) for task, result in tasks.items()
            for name, m in result["metrics"].items() if m.get("higher_is_better")]


def plot_grouped_bars(rows: Mapping[str, Mapping[str, tuple[float, Optional[float]]]], path: str | Path, title: str,
                      ylabel: str, logy: bool = False) -> Optional[Path]:
    """Bars of ``rows[series][key] = (value, stderr or None)``: one group per key, one colour per series
    (a run; dense / final), error bars where a standard error is known; None when there is nothing to draw."""
    rows = {label: r for label, r in rows.items() if r}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    if not keys:
        return None
    plt = _pyplot()
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.45 * len(keys) * len(rows) + 2)), 4.8))
    for i, (label, r) in enumerate(rows.items()):
        present = [j for j, k in enumerate(keys) if k in r]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in present]
        ys = [r[keys[j]][0] for j in present]
        errs = [r[keys[j]][1] or 0.0 for j in present]
        ax.bar(xs, ys, width, yerr=errs if any(errs) else None, capsize=2, label=label)
    ax.set_xticks(range(len(keys)), keys, rotation=60 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center",
                  fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_task_bars(series: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, title: str) -> Optional[Path]:
    """Every task score (higher is better) with its standard error, one colour per series."""
    rows = {label: {k: (v, e) for k, v, e in score_rows(tasks)} for label, tasks in series.items()}
    return plot_grouped_bars(rows, path, title, "score (± standard error)")


def evaluation_plots(out: Path, report: Mapping[str, Any]) -> list[Path]:
    """The task chart of a run (with its dense baseline when there is one), relative to ``out``."""
    series = {label: report[key]["tasks"] for key, label in (("dense_evaluation", "dense"), ("evaluation", "final"))
              if report.get(key)}
    path = plot_task_bars(series, out / "plots" / "tasks.png", "Evaluation tasks") if series else None
    return [path.relative_to(out)] if path else []


def block_and_type(name: str) -> tuple[int, str]:
    """``model.layers.3.mlp.down_proj(.weight)`` -> (3, "down_proj")."""
    parts = name.removesuffix(".weight").split(".")
    block = next((int(p) for p in parts if p.isdigit()), 0)
    return block, parts[-1]


def plot_level_heatmap(levels: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """Sparsity per layer as a blocks x layer-type grid, each cell labelled with its level ("2:4", "0.5").
    ``levels``: linear name -> SparsityTarget."""
    from compressor.sparsity.plan import level_sparsity, level_text

    cells = {block_and_type(name): level for name, level in levels.items()}
    blocks = sorted({b for b, _ in cells})
    types = list(dict.fromkeys(t for _, t in cells))
    grid = [[float(level_sparsity(cells[b, t])) if (b, t) in cells else float("nan") for b in blocks] for t in types]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(18.0, 2.5 + 0.6 * len(blocks)), 1.2 + 0.45 * len(types)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for i, t in enumerate(types):
        for j, b in enumerate(blocks):
            if (b, t) in cells:
                ax.text(j, i, level_text(cells[b, t]), ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_yticks(range(len(types)), types, fontsize=7)
    ax.set_xlabel("decoder block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="sparsity")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
