"""Fixed-mask fine-tuning: the kept weights of a one-shot mask train, the pruned ones stay zero."""

from __future__ import annotations

import torch

from compressor.methods.sparse_training.base import WeightRule


class FixedMask(WeightRule):
    """forward(W) = W * mask: the gradient of a pruned weight is zero, so a pruned weight never moves
    (AdamW without weight decay leaves a parameter whose gradient stays zero where it is)."""

    def __init__(self, mask: torch.Tensor, name: str = "layer") -> None:
        super().__init__(name)
        if mask.dim() != 2:
            raise ValueError(f"{name}: a fixed mask is (out, in), got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask.bool(), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape != self.mask.shape:
            raise ValueError(f"{self.name}: weight {tuple(weight.shape)} does not match its mask {tuple(self.mask.shape)}")
        return weight * self.mask.to(weight.dtype)

    def hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask.clone()
