"""A run's sparsity plan: resolved against the model before any work, and recorded in the run folder
(``plan.json`` with every layer, report.json's ``plan``, masks metadata, a heatmap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from compressor.errors import ConfigError
from compressor.models.layers import LinearTarget
from compressor.sparsity.plan import ResolvedPlan, SparsityPlan, layer_shapes, level_text

PLAN_FILE = "plan.json"


def setup_plan(folder: Path, path: Optional[str], resuming: bool,
               shapes: Optional[Mapping[str, tuple[int, int]]] = None) -> None:
    """Copy the plan file into the run folder at its start (``plan.json``, a set-up file like config.yaml;
    the finished run replaces it with the full listing), so that a resumed run can be held to it. With the
    run's layer ``shapes``, a saved plan that gives every layer the same level also holds (the listing of a
    finished run continued with more steps)."""
    if path is None:
        return
    plan, saved = SparsityPlan.load(path), folder / PLAN_FILE
    if resuming and saved.is_file():
        before = SparsityPlan.load(saved)
        same = before == plan or (shapes is not None and before.resolve(shapes).levels == plan.resolve(shapes).levels)
        if not same:
            raise ConfigError(f"cannot resume {folder}: the sparsity plan {path} differs from the one the run started "
                              f"with ({saved}); use that plan, or pass --overwrite (or another --output) to start over")
        return
    plan.save(saved)


def resolve_plan(path: str, targets: Sequence[LinearTarget] | Mapping[str, tuple[int, int]]) -> ResolvedPlan:
    """The plan file ``path`` checked against the run's pruned linears, or their ``{name: (out, in)}``
    (keys, widths, declared target); a ``PlanError`` names the file and the layer."""
    shapes = dict(targets) if isinstance(targets, Mapping) else layer_shapes(targets)
    return SparsityPlan.load(path, shapes).resolve(shapes)


def weight_levels(resolved: ResolvedPlan) -> dict[str, str]:
    """Level texts keyed by weight name, as masks and logits metadata record them."""
    return {f"{name}.weight": level_text(level) for name, level in resolved.levels.items()}


def uniform_text(resolved: ResolvedPlan) -> Optional[str]:
    level = resolved.uniform_level
    return None if level is None else level_text(level)


def plan_report(resolved: ResolvedPlan, path: str) -> dict[str, Any]:
    """report.json's ``plan``: the file, the exact parameter-weighted average and every layer's level."""
    average = resolved.average
    return {"file": str(path), "target": resolved.target, "average_sparsity": float(average),
            "average_sparsity_exact": f"{average.numerator}/{average.denominator}",
            "parameters": resolved.parameters, "uniform": resolved.uniform_level is not None,
            "levels": resolved.table()}


def record_plan(out: Path, resolved: ResolvedPlan, path: str, report: dict[str, Any], title: str) -> list[Path]:
    """Write ``plan.json`` (every layer by name, the declared target or else the exact average), put the
    plan into ``report``, and draw the level heatmap when the plan is not uniform; returns the plots
    (relative to ``out``)."""
    from compressor.reporting.plots import plot_level_heatmap

    report["plan"] = plan_report(resolved, path)
    resolved.listing().save(out / PLAN_FILE)
    if resolved.uniform_level is not None:
        return []
    return [plot_level_heatmap(resolved.levels, out / "plots" / "levels.png", title).relative_to(out)]
