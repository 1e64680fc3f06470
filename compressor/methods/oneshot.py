"""The built-in one-shot methods as registry entries: magnitude, Wanda, SparseGPT, SparseSwaps.

The math lives in their own modules (pure tensor functions); here each says what it needs and costs.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

import torch
from pydantic import Field, PositiveInt

from compressor.calibration.stats import InputStats
from compressor.config.base import StrictModel
from compressor.methods.interface import LayerJob, LayerResult, NoOptions, OneShotMethod, get_method, register
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.sparsegpt import HessianFactor, hessian_factor, sparsegpt
from compressor.methods.wanda import wanda_mask

MagnitudeOptions = WandaOptions = NoOptions


class SparseGPTOptions(StrictModel):
    damp: float = Field(0.01, gt=0, lt=1)  # fraction of the mean Hessian diagonal added to it
    block_size: PositiveInt = 128  # lazy-update column block
    update_weights: bool = True  # False: keep the original weights, use only the mask


class SparseSwapsOptions(StrictModel):
    warm_start: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    max_iters: PositiveInt = 1000  # swaps per row at most
    refit: bool = False  # least-squares re-fit of the kept weights afterwards


# SparseGPT's costs in one unit, about one row-column of the column sweep (~55 ns here), fitted to
# measured times at widths 576 and 1536: the sweep costs cols * (rows + 600), since each group of M
# columns runs a pass of small operations that costs as much as ~600 rows of updates; the Hessian
# factor costs cols^3 / 1600.
_SWEEP_ROWS_PER_COLUMN = 600


def sweep_cost(rows: int, cols: int) -> float:
    return cols * (rows + _SWEEP_ROWS_PER_COLUMN)


def factor_cost(cols: int) -> float:
    return cols**3 / 1600


def _timed(job: LayerJob, start: float, mask: torch.Tensor, weight: Optional[torch.Tensor] = None) -> LayerResult:
    return LayerResult(job.name, mask, weight, time.perf_counter() - start)


@register
class Magnitude(OneShotMethod):
    name, options, stats = "magnitude", MagnitudeOptions, "none"

    def solve(self, job, weight, stats, factor=None):
        start = time.perf_counter()
        return _timed(job, start, magnitude_mask(weight, job.sparsity, job.name))


@register
class Wanda(OneShotMethod):
    name, options, stats = "wanda", WandaOptions, "norms"

    def solve(self, job, weight, stats, factor=None):
        start = time.perf_counter()
        return _timed(job, start, wanda_mask(weight, stats.norms_sq, job.sparsity, job.name))


@register
class SparseGPT(OneShotMethod):
    name, options, stats, slices_pay = "sparsegpt", SparseGPTOptions, "gram", True

    def cost(self, rows: int, cols: int) -> float:
        return sweep_cost(rows, cols)

    def factor_cost(self, cols: int) -> float:
        return factor_cost(cols)

    @staticmethod
    def job_options(job: LayerJob) -> SparseGPTOptions:
        return job.options if isinstance(job.options, SparseGPTOptions) else (job.sparsegpt or SparseGPTOptions())

    def has_shared_factor(self, job: LayerJob) -> bool:
        return True

    def shared_factor(self, job: LayerJob, stats: InputStats) -> HessianFactor:
        return hessian_factor(stats.gram, self.job_options(job).damp, job.name)

    def solve(self, job, weight, stats, factor=None):
        start = time.perf_counter()
        opts = self.job_options(job)
        res = sparsegpt(weight, stats.gram, job.sparsity, what=job.name, factor=factor,
                        damp=opts.damp, block_size=opts.block_size, update_weights=opts.update_weights)
        return _timed(job, start, res.mask, res.weight if opts.update_weights else None)


@register
class SparseSwaps(OneShotMethod):
    """Refinement of a warm-start method's mask by exact 1-swaps; it shares the warm start's factor."""

    # its report counts swaps per layer, so layers are never stacked
    name, options, stats, stackable, slices_pay = "sparseswaps", SparseSwapsOptions, "gram", False, True

    @staticmethod
    def warm_job(job: LayerJob) -> LayerJob:
        mask_only = (job.sparsegpt or SparseGPTOptions()).model_copy(update={"update_weights": False})
        warm = job.options.warm_start
        return LayerJob(job.name, warm, job.sparsity, mask_only if warm == "sparsegpt" else None, mask_only)

    def cost(self, rows: int, cols: int) -> float:
        # not fitted: a swap search is of the order of the warm start's sweep
        return 2 * sweep_cost(rows, cols)

    def factor_cost(self, cols: int) -> float:
        return factor_cost(cols)

    def has_shared_factor(self, job: LayerJob) -> bool:
        warm = self.warm_job(job)
        return get_method(warm.method).has_shared_factor(warm)

    def shared_factor(self, job: LayerJob, stats: InputStats):
        warm = self.warm_job(job)
        return get_method(warm.method).shared_factor(warm, stats)

    def solve(self, job, weight, stats, factor=None):
        from compressor.methods.sparseswaps import sparseswaps

        start = time.perf_counter()
        opts: SparseSwapsOptions = job.options
        warm = self.warm_job(job)
        warm_mask = get_method(warm.method).solve(warm, weight, stats, factor).mask
        res = sparseswaps(weight, stats.gram, warm_mask, job.sparsity, max_iters=opts.max_iters, refit=opts.refit)
        extra = {
            "swaps": int(res.swaps_per_row.sum()),
            "swap_loss_before": float(res.loss_before.sum()),
            "swap_loss_after": float(res.loss_after.sum()),
        }
        return LayerResult(job.name, res.mask, res.weight if opts.refit else None,
                           time.perf_counter() - start, extra, warm_start_mask=warm_mask)
