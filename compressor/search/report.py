"""Figures and the Markdown page of `compressor search`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from compressor.models.arch import DecoderArch
from compressor.reporting.markdown import table
from compressor.reporting.plots import _pyplot, _save
from compressor.search.fisher import default_block_of


def _grid(values: Mapping[str, float]) -> tuple[np.ndarray, list[str], list[int]]:
    """{linear name: value} -> (blocks x layer types) array (NaN where a layer is absent), types, blocks."""
    types = list(dict.fromkeys(DecoderArch.layer_type(n) for n in values))
    blocks = sorted({int(default_block_of(n).rsplit(".", 1)[1]) for n in values})
    grid = np.full((len(blocks), len(types)), np.nan)
    for n, v in values.items():
        grid[blocks.index(int(default_block_of(n).rsplit(".", 1)[1])), types.index(DecoderArch.layer_type(n))] = v
    return grid, types, blocks


def plot_sensitivity(layer: Mapping[str, float], block: Mapping[str, float], path: Path) -> Path:
    """Fisher trace per weight: per layer (one line per layer type) and per block, log scale."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    grid, types, blocks = _grid(layer)
    for j, t in enumerate(types):
        ax.plot(blocks, grid[:, j], marker=".", label=t)
    bx.plot([int(b.rsplit(".", 1)[1]) for b in block], list(block.values()), marker="o", color="k")
    for a, title in ((ax, "per layer"), (bx, "per block")):
        a.set_yscale("log")
        a.set_xlabel("decoder block")
        a.set_ylabel("tr F / weights")
        a.set_title(f"Fisher trace, {title}")
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_levels(sparsity: Mapping[str, float], sensitivity: Optional[Mapping[str, float]], path: Path,
                title: str) -> Path:
    """Heatmap of the plan's per-layer sparsity (blocks x layer type), beside log10 of the Fisher traces."""
    plt = _pyplot()
    panels = 2 if sensitivity else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 6), squeeze=False)
    grid, types, blocks = _grid(sparsity)
    shown = [(axes[0][0], grid, f"{title}: sparsity", "viridis")]
    if sensitivity:
        s_grid, _, _ = _grid({n: math.log10(max(sensitivity[n], 1e-300)) for n in sparsity})
        shown.append((axes[0][1], s_grid, "log10 Fisher trace / weight", "magma"))
    for ax, values, label, cmap in shown:
        im = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
        ax.set_ylabel("decoder block")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_fitness(searches: Mapping[str, Mapping[str, Any]], path: Path, kind: str) -> Path:
    """Fitness on the fixed windows against fitness evaluations (from the seed at 0); one-shot baselines as
    horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, s) in enumerate(searches.items()):
        history = s.get("history") or []
        if history:
            points = [(0, s["seed_fitness"])] + [(h["evaluations"], h["fitness"]) for h in history]
            ax.plot(*zip(*points), marker=".", color=f"C{i}", label=name)
        else:
            ax.axhline(s["final_fitness"], linestyle="--", linewidth=1, color=f"C{i}",
                       label=f"{name} ({s['evaluations']} evaluations)")
    ax.set_yscale("log")
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel("KL to dense (fixed calibration windows)" if kind == "kl" else "perplexity (calibration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def search_markdown(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    rows = []
    for name, s in report["searches"].items():
        ppl = (s.get("perplexity") or {}).get("perplexity")
        rows.append([name, s["final_fitness"], ppl, s["evaluations"], s["tokens"], round(s["seconds"], 1),
                     s["average"], s["plan"]])
    parts = [f"# Mixed-sparsity search: {cfg['method']}, target {cfg['target']} on {report['model']['source']}", "",
             f"Levels {report['levels']}; fitness {cfg['fitness']['kind']} on {report['fixed_windows']} fixed calibration "
             f"windows; {report['layers']} layers; every plan is assembled from one level database (each layer solved "
             "once per level from the dense model's inputs).", "",
             table(["search", "final fitness", "perplexity", "evaluations", "tokens", "seconds", "average", "plan"], rows)]
    for seed, g in (report.get("seeding") or {}).items():
        reached = "never" if g["msp_evaluations"] is None else f"after {g['msp_evaluations']} evaluations"
        parts.append(f"\nSeed {seed}: MSP reached EvoPress's final fitness ({g['evopress_final']:.4g}) {reached}"
                     + ("" if g["ratio"] is None else f", {g['ratio']:.2f} of EvoPress's budget"))
    ev = report.get("evaluation")
    if ev:
        parts.append(f"\nPerplexity over {ev['windows']} windows of {ev['window_length']}"
                     + (f" ({ev['note']})" if ev.get("note") else ""))
    t = report["timing"]
    parts += ["", table(["phase", "seconds"], [[k, v] for k, v in t.items()])]
    for plot in report["outputs"]["plots"]:
        parts += ["", f"![{plot}]({plot})"]
    return "\n".join(parts) + "\n"
