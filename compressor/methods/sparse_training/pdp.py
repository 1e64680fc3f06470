"""PDP, parameter-free differentiable pruning (Cho et al. 2023), for N:M and unstructured sparsity.

Each weight gets the soft mask m = sigmoid((w^2 - t^2) / tau): t is the threshold between the kept and
the pruned magnitudes (N:M: in each group of M, halfway in w^2 between the N-th and the (N+1)-th largest
|w|; unstructured: the same between the last kept and the first pruned weight of the layer), held
constant in the backward pass, so the gradient of w * m(w) moves weights across the threshold. tau is
relative to the layer's mean t^2 (``tau_rel``), which makes one setting fit layers of any scale, and is
annealed by the trainer. A ramp r in [0, 1] blends the mask in: the weight used is w * (1 - r (1 - m)).
At the end the hard mask is m >= 0.5, which is the top-N of w^2 in every group (exactly N:M; on ties
the top-N decides).
"""

from __future__ import annotations

from typing import Union

import torch

from compressor.methods.sparse_training.base import WeightRule
from compressor.sparsity import NM, Unstructured, check_divisible, group_view, nm_mask_from_scores
from compressor.sparsity import unstructured_mask_from_scores

Sparsity = Union[NM, Unstructured]
_TINY = torch.finfo(torch.float32).tiny


def pdp_threshold_sq(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """t^2, detached, float32: (out, in / M, 1) for N:M (one per group), a scalar for unstructured."""
    w2 = weight.detach().float().pow(2)
    if isinstance(sparsity, NM):
        top = group_view(w2, sparsity.m, "weight").topk(sparsity.n + 1, dim=-1).values  # (out, G, N+1), descending
        return 0.5 * (top[..., sparsity.n - 1] + top[..., sparsity.n]).unsqueeze(-1)  # (out, G, 1)
    flat = w2.reshape(-1)
    pruned = int(flat.numel() * sparsity.sparsity)  # as unstructured_mask_from_scores counts them
    if pruned == 0:
        return flat.min() * 0.5  # nothing to prune: every weight sits above the threshold
    largest_pruned = flat.kthvalue(pruned).values
    smallest_kept = flat.kthvalue(pruned + 1).values
    return 0.5 * (largest_pruned + smallest_kept)


def pdp_soft_mask(weight: torch.Tensor, sparsity: Sparsity, tau_rel: float, ramp: float = 1.0) -> torch.Tensor:
    """(out, in) float32: 1 - ramp * (1 - sigmoid((w^2 - t^2) / tau)), tau = tau_rel * mean t^2 of the layer.

    Differentiable in ``weight`` through w^2; t and tau are constants of the step.
    """
    if not tau_rel > 0:
        raise ValueError(f"PDP tau_rel must be > 0, got {tau_rel}")
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"PDP ramp must be in [0, 1], got {ramp}")
    t2 = pdp_threshold_sq(weight, sparsity)
    tau = tau_rel * t2.mean().clamp_min(_TINY)
    w2 = weight.float().pow(2)
    if isinstance(sparsity, NM):
        z = (group_view(w2, sparsity.m, "weight") - t2).reshape(w2.shape) / tau  # (out, in)
    else:
        z = (w2 - t2) / tau
    mask = torch.sigmoid(z)
    return mask if ramp == 1.0 else 1.0 - ramp * (1.0 - mask)


def pdp_hard_mask(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """(out, in) bool: m >= 0.5 made exact, i.e. the top-N of w^2 per group (N:M) or per layer."""
    w2 = weight.detach().float().pow(2)
    if isinstance(sparsity, NM):
        return nm_mask_from_scores(w2, sparsity, "weight magnitudes")
    return unstructured_mask_from_scores(w2, sparsity.sparsity, scope="layer", what="weight magnitudes")


class PDPWeight(WeightRule):
    """Training: W * soft mask (``tau_rel`` and ``ramp`` set by the trainer every step); eval: W * hard mask."""

    def __init__(self, sparsity: Sparsity, shape: tuple[int, int], name: str = "layer") -> None:
        super().__init__(name)
        if isinstance(sparsity, NM):
            check_divisible(shape[1], sparsity.m, f"{name} (PDP {sparsity})")
        self.sparsity = sparsity
        self.tau_rel, self.ramp = 0.1, 1.0

    def set_schedule(self, tau_rel: float, ramp: float) -> None:
        if not tau_rel > 0 or not 0.0 <= ramp <= 1.0:
            raise ValueError(f"{self.name}: PDP needs tau_rel > 0 and ramp in [0, 1], got {tau_rel} and {ramp}")
        self.tau_rel, self.ramp = float(tau_rel), float(ramp)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight * self.hard_mask(weight).to(weight.dtype)
        return weight * pdp_soft_mask(weight, self.sparsity, self.tau_rel, self.ramp).to(weight.dtype)

    def hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return pdp_hard_mask(weight, self.sparsity)
