"""Input statistics of a linear layer, accumulated over calibration batches in float64.

Wanda needs the squared column norms ||X_j||^2; SparseGPT and SparseSwaps need the Gram matrix
G = X^T X (whose diagonal is those norms). Each batch's product is formed in ``product_dtype``
(float32, or bfloat16 on the CPU's bf16 matrix units; see compressor.precision) and added to a
float64 running sum, so that summing hundreds of batches loses nothing more. Column norms are
elementwise and cheap: always float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from compressor.errors import NonFiniteError

StatsKind = Literal["none", "norms", "gram"]


@dataclass
class InputStats:
    kind: StatsKind
    width: int
    tokens: int = 0
    col_sq: Optional[torch.Tensor] = None  # (in,) float64, sum over tokens of x_j^2
    gram: Optional[torch.Tensor] = field(default=None, repr=False)  # (in, in) float64, sum of x x^T
    product_dtype: torch.dtype = torch.float32  # of each batch's X^T X (float64 inputs stay float64)

    @classmethod
    def empty(cls, kind: StatsKind, width: int, product_dtype: torch.dtype = torch.float32) -> "InputStats":
        stats = cls(kind, width, product_dtype=product_dtype)
        if kind == "gram":
            stats.gram = torch.zeros(width, width, dtype=torch.float64)
        elif kind == "norms":
            stats.col_sq = torch.zeros(width, dtype=torch.float64)
        return stats

    def add(self, x: torch.Tensor, what: str = "layer input") -> None:
        """Add a batch of inputs (..., in)."""
        if self.kind == "none":
            return
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
        if x.shape[1] != self.width:
            raise ValueError(f"{what}: expected width {self.width}, got {x.shape[1]}")
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"{what}: non-finite activations during calibration (check the weights for NaN/inf)")
        if self.kind == "gram":
            x = x if x.dtype == torch.float64 else x.to(self.product_dtype)
            # Hooks fire inside the block's autocast region, which would turn a float32 product into bf16.
            with torch.autocast(x.device.type, enabled=False):
                self.gram.add_(x.T @ x)  # summed in float64 without a float64 copy of the product
        else:
            x = x if x.dtype == torch.float64 else x.float()
            self.col_sq += (x * x).sum(dim=0).to(torch.float64)
        self.tokens += x.shape[0]

    @property
    def norms_sq(self) -> torch.Tensor:
        """Squared column norms, from whichever statistic was gathered."""
        if self.gram is not None:
            return torch.diagonal(self.gram).clone()
        if self.col_sq is not None:
            return self.col_sq
        raise ValueError("these statistics hold neither norms nor a Gram matrix")
