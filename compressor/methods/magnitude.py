"""Magnitude pruning: keep the largest |w| (per group of M for N:M, per layer for unstructured)."""

from __future__ import annotations

import torch

from compressor.sparsity import SparsityTarget, mask_from_scores


def magnitude_mask(weight: torch.Tensor, sparsity: SparsityTarget, what: str = "weight") -> torch.Tensor:
    return mask_from_scores(weight.abs().float(), sparsity, scope="layer", what=what)
