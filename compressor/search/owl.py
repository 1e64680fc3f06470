"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2024), as a baseline allocation.

Per decoder block: pool the Wanda scores |W_ij| * ||X_j|| of all its linears; the block's outlier ratio D
is the fraction of scores above M x their mean. Blocks with more outliers are pruned less: D is mapped
linearly onto sparsities of width 2 * lambda, shifted so the parameter-weighted average is the target S
(``linear_allocation``; the reference code does the same with an unweighted mean, blocks being equal).
The range is [S - lambda, S + lambda] when the mean ratio sits mid-range, as in OWL's own code.

Per-layer levels come from snapping each layer's block sparsity onto a level set at the exact average:
an N:M level set for OWL's N:M variant, a fine unstructured grid (``OWL_GRID``, steps of 0.001) otherwise,
so that the plan's average is exact and its levels are short decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from compressor.methods.wanda import wanda_scores
from compressor.search.levels import LevelSet, SearchSpace, linear_allocation
from compressor.search.repair import snap
from compressor.sparsity.nm import SparsityTarget

OWL_GRID = LevelSet.unstructured(0.001, 0.999, 0.001)  # the unstructured "level set" OWL snaps onto
# A small grid around EvoPress's OWL defaults (M = 5, lambda = 0.08): outlier thresholds and spreads.
OWL_MS = (3.0, 5.0, 7.0, 10.0)
OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.12)


def block_wanda_scores(weights: Sequence[torch.Tensor], norms_sq: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The Wanda scores of a block's linears, from their weights (out, in) and input norms^2 (in,)."""
    return [wanda_scores(w, n) for w, n in zip(weights, norms_sq)]


def outlier_ratios(scores: Sequence[torch.Tensor], ms: Sequence[float]) -> list[float]:
    """For each M: the fraction of all the given scores (a block's linears pooled) above M x their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores]).double()
    mean = flat.mean()
    return [float((flat > m * mean).double().mean()) for m in ms]


def owl_sparsities(ratios: Sequence[float], block_sizes: Sequence[int], target: float, lam: float) -> np.ndarray:
    """Per-block sparsities: the most outliers get the lowest, spread 2 * ``lam``, weighted average ``target``."""
    return linear_allocation(ratios, block_sizes, target, lam)


def owl_levels(block_sparsity: Mapping[str, float], block_of: Mapping[str, str],
               space: SearchSpace) -> dict[str, SparsityTarget]:
    """Per-layer levels of ``space`` (its names; ``block_of[name]`` is the layer's block) nearest to
    its block's sparsity, at the space's exact average."""
    wanted = [block_sparsity[block_of[n]] for n in space.names]
    return space.to_levels(snap(space.level_positions(wanted), space))


@dataclass(frozen=True)
class OwlSetting:
    m: float
    lam: float
    block_sparsity: dict[str, float]


def owl_grid(ratios_by_m: Mapping[float, Mapping[str, float]], block_sizes: Mapping[str, int], target: float,
             lambdas: Sequence[float] = OWL_LAMBDAS) -> list[OwlSetting]:
    """Every (M, lambda) allocation of a small grid, from the blocks' outlier ratios per M (one pass over
    the scores gives all M: ``outlier_ratios``); settings whose sparsities would leave (0, 1) are left out.
    Pick the best by calibration fitness (never evaluation data)."""
    out = []
    for m, ratios in ratios_by_m.items():
        blocks = list(ratios)
        for lam in lambdas:
            try:
                s = owl_sparsities([ratios[b] for b in blocks], [block_sizes[b] for b in blocks], target, lam)
            except ValueError:
                continue
            out.append(OwlSetting(m, lam, dict(zip(blocks, s.tolist()))))
    return out
