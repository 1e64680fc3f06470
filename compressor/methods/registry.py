"""One entry point for every one-shot method: a per-layer job (weight, statistics, options) -> result.

The pipeline asks a method which input statistic it needs and later calls ``solve_layer`` (or
``solve_layers`` for layers reading the same inputs) through whatever executor it uses; methods never
learn how they are scheduled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from pydantic import Field, PositiveInt

from compressor.calibration.stats import InputStats, StatsKind
from compressor.config.base import StrictModel
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.sparsegpt import HessianFactor, hessian_factor, sparsegpt
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import NM, SparsityTarget

MethodName = Literal["magnitude", "wanda", "sparsegpt", "sparseswaps"]


class MagnitudeOptions(StrictModel):
    pass


class WandaOptions(StrictModel):
    pass


class SparseGPTOptions(StrictModel):
    damp: float = Field(0.01, gt=0, lt=1)  # fraction of the mean Hessian diagonal added to it
    block_size: PositiveInt = 128  # lazy-update column block
    update_weights: bool = True  # False: keep the original weights, use only the mask


class SparseSwapsOptions(StrictModel):
    warm_start: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    max_iters: PositiveInt = 1000  # swaps per row at most
    refit: bool = False  # least-squares re-fit of the kept weights afterwards


MethodOptions = Union[MagnitudeOptions, WandaOptions, SparseGPTOptions, SparseSwapsOptions]

STATS_NEEDED: dict[str, StatsKind] = {
    "magnitude": "none",
    "wanda": "norms",
    "sparsegpt": "gram",
    "sparseswaps": "gram",
}


@dataclass
class LayerJob:
    name: str  # weight name, e.g. "model.layers.3.mlp.down_proj.weight"
    method: str
    sparsity: SparsityTarget
    options: Any  # the method's options model
    sparsegpt: Optional[SparseGPTOptions] = None  # for a SparseGPT warm start


@dataclass
class LayerResult:
    name: str
    mask: torch.Tensor  # bool (out, in)
    weight: Optional[torch.Tensor]  # new weight if the method changed the kept values, else None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific report items
    warm_start_mask: Optional[torch.Tensor] = None  # refinement methods: the mask they started from


def _sparsegpt_options(job: LayerJob) -> Optional[SparseGPTOptions]:
    """The SparseGPT options a job runs with, if it runs SparseGPT at all (itself or as a warm start)."""
    if job.method == "sparsegpt":
        return job.options if isinstance(job.options, SparseGPTOptions) else (job.sparsegpt or SparseGPTOptions())
    if job.method == "sparseswaps" and job.options.warm_start == "sparsegpt":
        return job.sparsegpt or SparseGPTOptions()
    return None


def has_shared_factor(job: LayerJob) -> bool:
    return _sparsegpt_options(job) is not None


def shared_factor(job: LayerJob, stats: InputStats) -> Optional[HessianFactor]:
    """The part of a job that depends only on its input statistics (None if ``not has_shared_factor``):
    compute it once per statistics group and pass it to every ``solve_layer`` of that group."""
    opts = _sparsegpt_options(job)
    return None if opts is None else hessian_factor(stats.gram, opts.damp, job.name)


def row_separable(job: LayerJob) -> bool:
    """Whether solving a slice of the weight's rows gives that slice of the whole layer's result: true
    for N:M, where every method decides each row on its own; not for unstructured SparseGPT (one
    threshold per column block over all rows) or magnitude (one threshold per layer)."""
    return isinstance(job.sparsity, NM)


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
    rows of the result: all row separable with the same method and options, and a method whose report
    items are not per-layer sums over rows (SparseSwaps counts its swaps per layer)."""
    first = jobs[0]
    key = (first.method, first.sparsity, first.options, first.sparsegpt)
    return first.method != "sparseswaps" and all(
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
    jobs: list[LayerJob], weights: list[torch.Tensor], stats: InputStats, factor: Optional[HessianFactor] = None
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


def _one_shot_mask(
    method: str, job: LayerJob, weight: torch.Tensor, stats: InputStats, factor: Optional[HessianFactor] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    what = job.name
    if method == "magnitude":
        return magnitude_mask(weight, job.sparsity, what), None
    if method == "wanda":
        return wanda_mask(weight, stats.norms_sq, job.sparsity, what), None
    if method == "sparsegpt":
        opts = _sparsegpt_options(job)
        res = sparsegpt(
            weight, stats.gram, job.sparsity, what=what, factor=factor,
            damp=opts.damp, block_size=opts.block_size, update_weights=opts.update_weights,
        )
        return res.mask, (res.weight if opts.update_weights else None)
    raise ValueError(f"unknown one-shot method {method!r}")


def solve_layer(
    job: LayerJob, weight: torch.Tensor, stats: InputStats, factor: Optional[HessianFactor] = None
) -> LayerResult:
    """Run one method on one layer, or on a slice of its rows if ``row_separable(job)``. ``stats`` must
    hold what ``STATS_NEEDED[job.method]`` names; ``factor`` is ``shared_factor(job, stats)`` or None
    (then it is computed here)."""
    start = time.perf_counter()
    if job.method != "sparseswaps":
        mask, new_weight = _one_shot_mask(job.method, job, weight, stats, factor)
        return LayerResult(job.name, mask, new_weight, time.perf_counter() - start)

    from compressor.methods.sparseswaps import sparseswaps

    opts: SparseSwapsOptions = job.options
    warm_job = LayerJob(job.name, opts.warm_start, job.sparsity, None,
                        (job.sparsegpt or SparseGPTOptions()).model_copy(update={"update_weights": False}))
    warm_mask, _ = _one_shot_mask(opts.warm_start, warm_job, weight, stats, factor)
    res = sparseswaps(weight, stats.gram, warm_mask, job.sparsity, max_iters=opts.max_iters, refit=opts.refit)
    extra = {
        "swaps": int(res.swaps_per_row.sum()),
        "swap_loss_before": float(res.loss_before.sum()),
        "swap_loss_after": float(res.loss_after.sum()),
    }
    return LayerResult(job.name, res.mask, res.weight if opts.refit else None,
                       time.perf_counter() - start, extra, warm_start_mask=warm_mask)
