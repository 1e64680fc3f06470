"""The layer-wise objective every one-shot method minimises, from the Gram matrix of its inputs.

For inputs X (tokens x in) and G = X^T X, the output error of replacing W by Wp is
||(W - Wp) X^T||_F^2 = tr((W - Wp) G (W - Wp)^T); relative to ||W X^T||_F^2 it is the layer
reconstruction error of BENCHMARK.md. Computed in float64: the two traces differ by orders of magnitude.
"""

from __future__ import annotations

import torch


def output_energy(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row ||delta_r X^T||^2 = delta_r G delta_r^T, shape (out,), float64."""
    d = delta.detach().to(torch.float64)
    return ((d @ gram.to(torch.float64)) * d).sum(dim=1)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W - Wp) G (W - Wp)^T) / tr(W G W^T); 0 when the layer never saw a non-zero input."""
    denom = output_energy(weight, gram).sum()
    if denom <= 0:
        return 0.0
    return float(output_energy(weight.to(torch.float64) - pruned.to(torch.float64), gram).sum() / denom)
