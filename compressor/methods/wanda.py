"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||, compared within each output row.

For N:M the comparison is within each group of M of a row; unstructured compares whole rows.
"""

from __future__ import annotations

import torch

from compressor.sparsity import SparsityTarget, mask_from_scores


def wanda_scores(weight: torch.Tensor, norms_sq: torch.Tensor) -> torch.Tensor:
    """(out, in) scores from the weight and the squared column norms of the inputs (in,)."""
    return weight.abs().double() * norms_sq.double().clamp_min(0).sqrt().unsqueeze(0)  # (out, in)


def wanda_mask(weight: torch.Tensor, norms_sq: torch.Tensor, sparsity: SparsityTarget, what: str = "weight") -> torch.Tensor:
    return mask_from_scores(wanda_scores(weight, norms_sq), sparsity, scope="row", what=what)
