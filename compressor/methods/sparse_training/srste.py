"""SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks from scratch").

The forward pass uses W * m with m the magnitude N:M mask of the current dense W; the gradient reaches
W straight through (as if no mask were there), plus the sparse-refined term lambda_w (1 - m) * W, which
pulls pruned weights towards zero so that the mask settles. One step of a plain SGD optimizer is then

    W <- W - lr * (dL/dW~ + lambda_w * (1 - m) * W),   W~ = W * m.

The sparse-refined term is delivered as the gradient of the penalty lambda_w * 0.5 ||(1 - m) * W||^2
(m held constant) added to the loss: every backend's loss scaling and gradient accumulation then applies
to it exactly as to the loss, so a step gets it once whatever the number of micro-batches.
"""

from __future__ import annotations

from typing import Optional

import torch

from compressor.methods.sparse_training.base import WeightRule
from compressor.sparsity import NM, check_divisible, nm_mask_from_scores


class _StraightThrough(torch.autograd.Function):
    """W * mask forward, the identity backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def straight_through_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W * mask whose gradient passes to W unmasked (the straight-through estimator)."""
    return _StraightThrough.apply(weight, mask)


def sparse_refined_penalty(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * ||(1 - mask) * W||^2 in float32; its gradient with respect to W is (1 - mask) * W."""
    pruned = weight.float() * (~mask.bool()).float()
    return 0.5 * pruned.pow(2).sum()


def magnitude_nm_mask(weight: torch.Tensor, nm: NM) -> torch.Tensor:
    """(out, in) bool: the N largest |w| of every group of M along the input dimension."""
    return nm_mask_from_scores(weight.detach().abs(), nm, "weight magnitudes")


class SRSTEWeight(WeightRule):
    """The SR-STE training weight: straight-through W * m, m the magnitude N:M mask of the current W."""

    def __init__(self, nm: NM, shape: tuple[int, int], name: str = "layer") -> None:
        super().__init__(name)
        check_divisible(shape[1], nm.m, f"{name} (SR-STE {nm})")
        self.nm = nm
        self._mask: Optional[torch.Tensor] = None

    def mask_of(self, weight: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            self._mask = magnitude_nm_mask(weight, self.nm)
        return self._mask

    def weights_changed(self) -> None:
        self._mask = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask_of(weight)
        if not self.training:
            return weight * mask.to(weight.dtype)
        if self.track_penalty:
            self.penalty = sparse_refined_penalty(weight, mask)
        return straight_through_mask(weight, mask)

    def hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return magnitude_nm_mask(weight, self.nm)
