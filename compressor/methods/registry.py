"""One entry point for every one-shot method: a per-layer job (weight, statistics, options) -> result.

The pipeline asks a method which input statistic it needs and later calls ``solve_layer`` through
whatever executor it uses; methods never learn how they are scheduled.
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
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import SparsityTarget

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


def _one_shot_mask(method: str, job: LayerJob, weight: torch.Tensor, stats: InputStats) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    what = job.name
    if method == "magnitude":
        return magnitude_mask(weight, job.sparsity, what), None
    if method == "wanda":
        return wanda_mask(weight, stats.norms_sq, job.sparsity, what), None
    if method == "sparsegpt":
        from compressor.methods.sparsegpt import sparsegpt

        opts = job.options if isinstance(job.options, SparseGPTOptions) else (job.sparsegpt or SparseGPTOptions())
        res = sparsegpt(
            weight, stats.gram, job.sparsity,
            damp=opts.damp, block_size=opts.block_size, update_weights=opts.update_weights,
        )
        return res.mask, (res.weight if opts.update_weights else None)
    raise ValueError(f"unknown one-shot method {method!r}")


def solve_layer(job: LayerJob, weight: torch.Tensor, stats: InputStats) -> LayerResult:
    """Run one method on one layer. ``stats`` must hold what ``STATS_NEEDED[job.method]`` names."""
    start = time.perf_counter()
    if job.method != "sparseswaps":
        mask, new_weight = _one_shot_mask(job.method, job, weight, stats)
        return LayerResult(job.name, mask, new_weight, time.perf_counter() - start)

    from compressor.methods.sparseswaps import sparseswaps

    opts: SparseSwapsOptions = job.options
    warm_job = LayerJob(job.name, opts.warm_start, job.sparsity, None,
                        (job.sparsegpt or SparseGPTOptions()).model_copy(update={"update_weights": False}))
    warm_mask, _ = _one_shot_mask(opts.warm_start, warm_job, weight, stats)
    res = sparseswaps(weight, stats.gram, warm_mask, job.sparsity, max_iters=opts.max_iters, refit=opts.refit)
    extra = {
        "swaps": int(res.swaps_per_row.sum()),
        "swap_loss_before": float(res.loss_before.sum()),
        "swap_loss_after": float(res.loss_after.sum()),
    }
    return LayerResult(job.name, res.mask, res.weight if opts.refit else None,
                       time.perf_counter() - start, extra, warm_start_mask=warm_mask)
