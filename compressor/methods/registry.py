"""One entry point for every one-shot method: a per-layer job (weight, statistics, options) -> result.

The pipeline asks a method (``METHODS[name]``, see ``compressor.methods.interface``) which input
statistic it needs and later calls ``solve_layer`` (or ``solve_layers`` for layers reading the same
inputs) through whatever executor it uses; methods never learn how they are scheduled.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from compressor.calibration.stats import InputStats
from compressor.methods.interface import (
    METHODS, LayerJob, LayerResult, OneShotMethod, get_method, register, registered_name, section_options,
)
from compressor.methods.oneshot import MagnitudeOptions, SparseGPTOptions, SparseSwapsOptions, WandaOptions

__all__ = [
    "METHODS", "LayerJob", "LayerResult", "OneShotMethod", "get_method", "register", "section_options",
    "MagnitudeOptions", "WandaOptions", "SparseGPTOptions", "SparseSwapsOptions", "has_shared_factor",
    "shared_factor", "row_separable", "merge_row_chunks", "stackable", "split_rows", "solve_layer", "solve_layers",
]


def has_shared_factor(job: LayerJob) -> bool:
    return get_method(job.method).has_shared_factor(job)


def shared_factor(job: LayerJob, stats: InputStats) -> Optional[Any]:
    """The part of a job that depends only on its input statistics (None if ``not has_shared_factor``):
    compute it once per statistics group and pass it to every ``solve_layer`` of that group."""
    method = get_method(job.method)
    return method.shared_factor(job, stats) if method.has_shared_factor(job) else None


def row_separable(job: LayerJob) -> bool:
    """Whether solving a slice of the weight's rows gives that slice of the whole layer's result: true
    for N:M, where every built-in method decides each row on its own; not for unstructured SparseGPT
    (one threshold per column block over all rows) or magnitude (one threshold per layer)."""
    return get_method(job.method).row_separable(job.sparsity)


def merge_row_chunks(parts: list[LayerResult]) -> LayerResult:
    """One layer's result from the results of its row slices, in row order."""
    if len(parts) == 1:
        return parts[0]

    def cat(key: str) -> Optional[torch.Tensor]:
        values = [getattr(p, key) for p in parts]
        return None if values[0] is None else torch.cat(values)

    extra = {k: sum(p.extra[k] for p in parts) for k in parts[0].extra}  # every report item is a sum over rows
    return LayerResult(parts[0].name, cat("mask"), cat("weight"), sum(p.seconds for p in parts), extra,
                       cat("warm_start_mask"))


def stackable(jobs: list[LayerJob]) -> bool:
    """Whether jobs on the same inputs can run as one weight stacked along its rows, each taking its own
    rows of the result: all row separable with the same method, level and options, and a method whose
    report items are per-layer sums over rows (SparseSwaps counts its swaps per layer)."""
    first = jobs[0]
    key = (first.method, first.sparsity, first.options, first.sparsegpt)
    return get_method(first.method).stackable and all(
        row_separable(j) and (j.method, j.sparsity, j.options, j.sparsegpt) == key for j in jobs)


def split_rows(result: LayerResult, names: list[str], rows: list[int]) -> list[LayerResult]:
    """The inverse of :func:`merge_row_chunks` for a result without report items: each name's rows in
    order, with a share of the time in proportion to them."""
    out, r0, total = [], 0, sum(rows)
    for name, n in zip(names, rows):
        part = lambda t: None if t is None else t[r0 : r0 + n]  # noqa: E731
        out.append(LayerResult(name, part(result.mask), part(result.weight), result.seconds * n / total,
                               {}, part(result.warm_start_mask)))
        r0 += n
    return out


def solve_layers(
    jobs: list[LayerJob], weights: list[torch.Tensor], stats: InputStats, factor: Optional[Any] = None
) -> list[LayerResult]:
    """Several layers, or row slices of them, that read the same inputs (q/k/v, gate/up): the factor is
    made once for all, and :func:`stackable` jobs run as one stacked weight, since a SparseGPT sweep pays
    a per-column cost (one pass of small operations per group of M columns) that is the same for 100
    rows as for 1000."""
    if factor is None and has_shared_factor(jobs[0]):
        factor = shared_factor(jobs[0], stats)
    if len(jobs) == 1 or not stackable(jobs):
        return [solve_layer(j, w, stats, factor) for j, w in zip(jobs, weights)]
    whole = solve_layer(jobs[0], torch.cat(weights), stats, factor)
    return split_rows(whole, [j.name for j in jobs], [w.shape[0] for w in weights])


def solve_layer(job: LayerJob, weight: torch.Tensor, stats: InputStats, factor: Optional[Any] = None) -> LayerResult:
    """Run one method on one layer, or on a slice of its rows if ``row_separable(job)``. ``stats`` must
    hold what ``get_method(job.method).stats`` names; ``factor`` is ``shared_factor(job, stats)`` or None
    (then it is computed here)."""
    method = get_method(job.method)
    if factor is None and method.has_shared_factor(job):
        factor = method.shared_factor(job, stats)
    return method.solve(job, weight, stats, factor)
